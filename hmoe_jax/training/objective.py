"""The objective `train hybrid` minimises, its gradient and the update, as one program or block by block.

    loss = answer_loss + router_weight * (positive router BCE + negative router BCE) / 2

(the terms: `training.hybrid`'s module doc). Only the hybrid layer's router rows and projections
(`hybrid.artifacts.TRAINABLE`) are differentiated; every other parameter is frozen.

How it runs follows the model's `RunOptions.execution`:
- "program": the loss and its gradient are one jitted program through the whole model;
- "layerwise" (a full-size model on a CPU host): every part is a program of its own. Forward, the
  blocks before the hybrid layer run as in inference; the hybrid block and the blocks after it keep
  their inputs; the head gives the answer loss and its gradient with respect to the last residual;
  that cotangent is pulled back block by block (each block recomputed inside its own VJP program, so
  one block's activations exist at a time), and the hybrid block's VJP turns it, with the router
  term, into the gradient of its trainable parameters. Blocks of one kind share one forward and one
  VJP program. The same numbers as the one-program gradient (tests), in the memory of one block.

The `grouped` CPU MoE backend loops with data-dependent bounds, which reverse mode cannot
differentiate: pulling a cotangent back through a block's experts takes `dense` (CPU) or `ragged`;
forward-only parts keep the model's own backend.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ..hybrid.artifacts import TRAINABLE
from ..model.transformer import DecoderLayer, EmbeddingAndHead, default_position_ids, run

# The update rule. Its learning rate and weight decay live in its state (`inject_hyperparams`, initialised
# by `training.hybrid.optimizer` with a run's settings), so one compiled update serves every setting.
UPDATE = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=0.01)


def differentiable_backend() -> str:
    return "dense" if jax.default_backend() == "cpu" else "ragged"


# ------------------------------------------------------------------ the terms


def router_margins(router_logits: jax.Array, num_neural: int, top_k: int) -> jax.Array:
    """[..., E+D] -> [..., D]: each deterministic logit minus the k-th largest neural logit (> 0: the
    expert is in the top-k, unless other deterministic experts crowd it out)."""
    kth = jax.lax.top_k(router_logits[..., :num_neural], top_k)[0][..., -1:]
    return router_logits[..., num_neural:] - kth


def _working_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)  # float64 stays float64 (gradient checks)


def answer_terms(logits, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced cross-entropy of the answer tokens (mean per token), and its sums."""
    dtype = _working_dtype(logits)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(dtype), axis=-1)
    targets = batch["ids"][:, 1:]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logp, axis=-1) == targets).astype(dtype)
    w = batch["answer"][:, 1:] * batch["weight"][:, None]
    count = jnp.sum(w)
    answer_loss = jnp.sum(nll * w) / jnp.maximum(count, 1.0)
    return answer_loss, {"answer_loss": answer_loss, "answer_nll_sum": jnp.sum(nll * w),
                         "answer_correct": jnp.sum(correct * w), "answer_tokens": count}


def positive_router_bce(router_logits, batch, num_neural: int, top_k: int) -> tuple[jax.Array, jax.Array]:
    """(BCE of each deterministic expert's margin at the prompt's last token against the scenario's
    labels, the margins): router_logits [B, T, E+D]."""
    at = jnp.take_along_axis(router_logits, batch["prompt_last"][:, None, None], axis=1)[:, 0]
    z = router_margins(at.astype(_working_dtype(router_logits)), num_neural, top_k)
    pos = optax.sigmoid_binary_cross_entropy(z, batch["labels"]) * batch["weight"][:, None]
    return jnp.sum(pos) / (jnp.maximum(jnp.sum(batch["weight"]), 1.0) * z.shape[-1]), z


def negative_router_bce(router_logits, num_neural: int, top_k: int) -> jax.Array:
    """BCE of every deterministic expert's margin at a negative prompt's last token against 0."""
    z = router_margins(router_logits[:, -1].astype(_working_dtype(router_logits)), num_neural, top_k)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(z, jnp.zeros_like(z)))


# ------------------------------------------------------------------ the objective


@dataclasses.dataclass(frozen=True)
class Objective:
    """The objective of one hybrid model structure (`graphdef`, split from the model with the
    differentiable MoE backend). Hashable: the jitted programs take it as a static argument, so every
    trainer of the same model (a resumed run, another learning rate, a test) reuses their code."""

    graphdef: Any
    layer: int
    num_neural: int
    top_k: int
    use_router: bool
    forward_backend: str  # the model's own MoE backend, for the parts that are not differentiated
    layerwise: bool  # the model's execution is "layerwise": every part a program of its own

    def loss(self, params, frozen, batch, negatives, router_weight):
        """(total, aux), traced through the whole model (the "program" execution)."""
        model = nnx.merge(self.graphdef, params, frozen)
        mask = batch["mask"]
        out = model.forward(batch["ids"], mask, default_position_ids(mask), output_layer_info=True)
        total, aux = answer_terms(out.logits, batch)
        pos_bce, z = positive_router_bce(out.layer_info[self.layer]["router_logits"], batch, self.num_neural,
                                         self.top_k)
        aux.update(router_pos_bce=pos_bce, selected=z > 0)
        if self.use_router and negatives is not None:
            nmask = negatives["mask"]
            nout = model.forward(negatives["ids"], nmask, default_position_ids(nmask), output_layer_info=True,
                                 stop_after_layer=self.layer + 1)
            neg_bce = negative_router_bce(nout.layer_info[self.layer]["router_logits"], self.num_neural, self.top_k)
            aux["router_loss"] = 0.5 * (pos_bce + neg_bce)
            total = total + router_weight * aux["router_loss"]
        aux["loss"] = total
        return total, aux

    def loss_and_grad(self, params, frozen, batch, negatives, router_weight):
        """((total, aux), gradient with respect to `params`)."""
        if self.layerwise:
            return _layerwise_loss_and_grad(self, params, frozen, batch, negatives, router_weight)
        return _whole_loss_and_grad(self, params, frozen, batch, negatives, router_weight)

    def step(self, params, opt_state, frozen, batch, negatives, router_weight, clip_norm, lr):
        """One update: (new params, new optimizer state, aux with "grad_norm", all-finite flag)."""
        if self.layerwise:
            (loss, aux), grads = self.loss_and_grad(params, frozen, batch, negatives, router_weight)
            params, opt_state, norm, finite = _apply_update(params, opt_state, grads, loss, clip_norm, lr)
            return params, opt_state, {**aux, "grad_norm": norm}, finite
        return _whole_step(self, params, opt_state, frozen, batch, negatives, router_weight, clip_norm, lr)

    def answer_aux(self, params, frozen, batch) -> dict[str, jax.Array]:
        """The answer terms of a batch (held-out evaluation; no gradient)."""
        model = self.forward_model(params, frozen)
        return run(model, _answer_aux, batch["ids"], batch["mask"], batch["answer"], batch["weight"])

    def greedy(self, params, frozen, ids, mask, prompt_length: int, new_tokens: int):
        """Greedy continuations with full forwards (no KV cache: causal-mean extraction over the whole
        prefix, as in training), written into the room after each prompt."""
        return run(self.forward_model(params, frozen), _greedy, ids, mask, static=(prompt_length, new_tokens))

    def forward_model(self, params, frozen):
        """A model holding `params`, with the caller's own MoE backend (for what is not differentiated)."""
        return nnx.merge(self.graphdef, params, frozen).set_options(moe_backend=self.forward_backend)


def _answer_aux(model, ids, mask, answer, weight):
    logits = model.forward(ids, mask, default_position_ids(mask)).logits
    return _jitted_answer_terms(logits, {"ids": ids, "answer": answer, "weight": weight})


_jitted_answer_terms = jax.jit(lambda logits, batch: answer_terms(logits, batch)[1])


def _greedy(model, ids, mask, prompt_length: int, new_tokens: int):
    def body(i, carry):
        ids, mask = carry
        logits = model.forward(ids, mask, default_position_ids(mask)).logits
        token = jnp.argmax(logits[:, prompt_length - 1 + i], axis=-1).astype(ids.dtype)
        ids = jax.lax.dynamic_update_slice_in_dim(ids, token[:, None], prompt_length + i, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones_like(token)[:, None], prompt_length + i, axis=1)
        return ids, mask

    if model.runs_per_part(ids):  # layerwise: the token loop in Python, each forward block by block
        carry = (ids, mask)
        for i in range(new_tokens):
            carry = body(jnp.asarray(i, jnp.int32), carry)
        return carry[0][:, prompt_length:]
    return jax.lax.fori_loop(0, new_tokens, body, (ids, mask))[0][:, prompt_length:]


def _update(params, opt_state, grads, loss, clip_norm, lr):
    finite = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        finite &= jnp.all(jnp.isfinite(g))
    norm = optax.tree.norm(grads)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, opt_state.hyperparams["learning_rate"].dtype)
    updates, opt_state = UPDATE.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norm, finite


_apply_update = jax.jit(_update)


@functools.partial(jax.jit, static_argnums=0)
def _whole_loss_and_grad(objective: Objective, params, frozen, batch, negatives, router_weight):
    return jax.value_and_grad(objective.loss, has_aux=True)(params, frozen, batch, negatives, router_weight)


@functools.partial(jax.jit, static_argnums=0)
def _whole_step(objective: Objective, params, opt_state, frozen, batch, negatives, router_weight, clip_norm, lr):
    (loss, aux), grads = jax.value_and_grad(objective.loss, has_aux=True)(params, frozen, batch, negatives,
                                                                          router_weight)
    params, opt_state, norm, finite = _update(params, opt_state, grads, loss, clip_norm, lr)
    return params, opt_state, {**aux, "grad_norm": norm}, finite


# ------------------------------------------------------------------ block by block


def _layerwise_loss_and_grad(obj: Objective, params, frozen, batch, negatives, router_weight):
    model = nnx.merge(obj.graphdef, params, frozen).set_options(moe_backend=obj.forward_backend)
    layer, n_layers = obj.layer, model.config.num_hidden_layers
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    x_hybrid, ctx = _input_of_block(model, batch["ids"], batch["mask"], layer)
    hybrid = nnx.split(model.layers[layer], TRAINABLE, ...)
    x = _hybrid_forward(*hybrid, x_hybrid, ctx)
    inputs = []  # of blocks layer+1 .. n-1, for their VJPs
    for i in range(layer + 1, n_layers):
        inputs.append(x)
        x, _, _ = model.part(DecoderLayer.__call__, model.layers[i], x, ctx, None)
    (total, aux), cotangent = _head_loss_and_grad(*nnx.split(model.embedding_and_head), x, batch)
    with model.using(moe_backend=differentiable_backend()):
        for i in reversed(range(layer + 1, n_layers)):
            cotangent = _block_cotangent(*nnx.split(model.layers[i]), inputs[i - layer - 1], ctx, cotangent)
    with_router = obj.use_router and negatives is not None
    scale = 0.5 * router_weight if with_router else 0.0
    grads, pos_bce, z = _hybrid_grads(obj.num_neural, obj.top_k, *hybrid, x_hybrid, ctx, cotangent, batch, scale)
    aux.update(router_pos_bce=pos_bce, selected=z > 0)
    if with_router:
        xn, nctx = _input_of_block(model, jnp.asarray(negatives["ids"]), jnp.asarray(negatives["mask"]), layer)
        negative, neg_bce = _negative_grads(obj.num_neural, obj.top_k, *hybrid, xn, nctx, scale)
        grads = jax.tree.map(jnp.add, grads, negative)
        aux["router_loss"] = 0.5 * (pos_bce + neg_bce)
        total = total + router_weight * aux["router_loss"]
    aux["loss"] = total
    full = jax.tree.map(jnp.zeros_like, params)  # the trainable state: the hybrid layer's alone
    full["layers"][layer] = grads
    return (total, aux), full


def _input_of_block(model, ids, mask, layer: int):
    """hidden_states[layer] (the hybrid block's input) and the context every block reads."""
    x, ctx = model.part(EmbeddingAndHead.embed, model.embedding_and_head, ids, mask, default_position_ids(mask))
    for x, _, _ in model.blocks(x, ctx, layer):
        pass
    return x, ctx


@functools.partial(jax.jit, static_argnums=0)
def _hybrid_forward(graphdef, trainable, rest, x, ctx):
    return nnx.merge(graphdef, trainable, rest)(x, ctx)[0]


@functools.partial(jax.jit, static_argnums=0)
def _head_loss_and_grad(graphdef, state, x, batch):
    """((answer loss, aux), its gradient with respect to the last residual x)."""
    embedding_and_head = nnx.merge(graphdef, state)

    def loss(x):
        return answer_terms(embedding_and_head.logits(embedding_and_head.final_norm(x)), batch)

    return jax.value_and_grad(loss, has_aux=True)(x)


@functools.partial(jax.jit, static_argnums=0)
def _block_cotangent(graphdef, state, x, ctx, cotangent):
    """A block's input cotangent from its output's, the block recomputed inside."""
    block = nnx.merge(graphdef, state)
    return jax.vjp(lambda x: block(x, ctx)[0], x)[1](cotangent)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _hybrid_grads(num_neural, top_k, graphdef, trainable, rest, x, ctx, cotangent, batch, router_scale):
    """The trainable parameters' gradient from the hybrid block's output cotangent and the positive
    router term (weighted `router_scale`); with the term's value and the margins."""
    def surrogate(trainable):
        y, info, _ = nnx.merge(graphdef, trainable, rest)(x, ctx)
        pos_bce, z = positive_router_bce(info["router_logits"], batch, num_neural, top_k)
        return jnp.sum(y * cotangent) + router_scale * pos_bce, (pos_bce, z)

    grads, (pos_bce, z) = jax.grad(surrogate, has_aux=True)(trainable)
    return grads, pos_bce, z


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _negative_grads(num_neural, top_k, graphdef, trainable, rest, x, ctx, router_scale):
    """The trainable parameters' gradient of the negative router term (weighted `router_scale`)."""
    def term(trainable):
        _, info, _ = nnx.merge(graphdef, trainable, rest)(x, ctx)
        neg_bce = negative_router_bce(info["router_logits"], num_neural, top_k)
        return router_scale * neg_bce, neg_bce

    grads, neg_bce = jax.grad(term, has_aux=True)(trainable)
    return grads, neg_bce
