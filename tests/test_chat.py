"""gpt-oss's chat format: the checkpoint's template rendered as transformers renders it, the final
channel read out of generated ids, and the baselines in both prompt formats."""

import json
import shutil

import pytest
from tokenizers import Tokenizer

from eval import baselines_cli
from hmoe_jax.checkpoint import synthetic
from hmoe_jax.checkpoint.chat import ChatFormat, final_answer
from hmoe_jax.checkpoint.location import CheckpointError
from hmoe_jax.domains.cre import generator as cre_generator
from hmoe_jax.evaluation.baselines import prompt_formats_for

CONFIG = synthetic.tiny_config(vocab_size=320, hidden_size=64, num_hidden_layers=2)
PROMPTS = ["What is the DSCR for NOI $1,250,000 and annual debt service $1,000,000?",
           "Loan 7,500,000; value 10,000,000.\nLTV?", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    train_json, eval_json = cre_generator.write_dataset(root / "data", n_train=40, n_eval=6)
    ckpt = synthetic.write_hf_checkpoint(root / "ckpt", CONFIG, seed=3)
    prompts = [s["input_prompt"] for s in json.loads(train_json.read_text())]
    synthetic.write_tokenizer(ckpt, prompts + PROMPTS, CONFIG)
    return dict(ckpt=ckpt, eval=eval_json, root=root)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_file(str(checkpoint["ckpt"] / "tokenizer.json"))


def _transformers_ids(path, prompts, **variables):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    return [list(hf.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False, **variables)) for p in prompts]


@pytest.mark.parametrize("effort", [None, "high"])
def test_rendered_ids_equal_transformers_apply_chat_template(checkpoint, tokenizer, effort):
    chat = ChatFormat.of(checkpoint["ckpt"])
    assert chat.source.name == "chat_template.jinja"
    variables = {} if effort is None else {"reasoning_effort": effort}
    ours = chat.with_variables(**variables).encode(tokenizer, PROMPTS)
    assert ours == _transformers_ids(checkpoint["ckpt"], PROMPTS, **variables)
    # The template's structure: harmony's tokens as single ids, the assistant's turn left open.
    start, end = tokenizer.token_to_id("<|start|>"), tokenizer.token_to_id("<|end|>")
    assert ours[0].count(start) == 3 and ours[0].count(end) == 2
    last_turn = ours[0][len(ours[0]) - ours[0][::-1].index(start) - 1:]
    assert tokenizer.decode(last_turn, skip_special_tokens=False).replace(" ", "") == "<|start|>assistant"
    if effort:
        assert "high" in tokenizer.decode(ours[0], skip_special_tokens=False)


def test_template_from_the_tokenizer_config(checkpoint, tokenizer, tmp_path):
    """A checkpoint that keeps its template in tokenizer_config.json (no chat_template.jinja) renders the same."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint["ckpt"], ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = (ckpt / "chat_template.jinja").read_text()
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "chat_template.jinja").unlink()
    chat = ChatFormat.of(ckpt)
    assert chat.source.name == "tokenizer_config.json"
    assert chat.encode(tokenizer, PROMPTS) == _transformers_ids(ckpt, PROMPTS)


def test_a_checkpoint_without_a_template_names_the_files_it_looked_for(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint["ckpt"], ckpt)
    (ckpt / "chat_template.jinja").unlink()
    with pytest.raises(CheckpointError, match="no chat template") as e:
        ChatFormat.of(ckpt)
    assert str(ckpt / "chat_template.jinja") in str(e.value) and "tokenizer_config.json" in str(e.value)
    code = baselines_cli.main(["--model", str(ckpt), "--data", str(checkpoint["eval"]), "--n", "2",
                               "--new-tokens", "2", "--styles", "zeroshot", "--prompt-format", "chat",
                               "--out", str(tmp_path / "out")])
    assert code == 2
    assert "chat_template.jinja" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # The library's decision: by default raw prompts only, and why; chat asked for is an error.
    notes = []
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    assert prompt_formats_for(ckpt, tokenizer, note=notes.append) == (["raw"], None)
    assert len(notes) == 1 and notes[0].startswith("raw prompts only: ") and "chat_template.jinja" in notes[0]
    with pytest.raises(CheckpointError, match="no chat template"):
        prompt_formats_for(ckpt, tokenizer, ["raw", "chat"])
    assert prompt_formats_for(ckpt, tokenizer, ["raw"]) == (["raw"], None)


def test_prompt_formats_default_to_both_where_the_checkpoint_has_a_template(checkpoint, tokenizer):
    formats, chat = prompt_formats_for(checkpoint["ckpt"], tokenizer, reasoning_effort="high")
    assert formats == ["raw", "chat"] and "high" in chat.render(["a prompt"])[0]
    assert prompt_formats_for(checkpoint["ckpt"], tokenizer, ["chat", "chat"])[0] == ["chat"]
    with pytest.raises(ValueError, match="unknown prompt format"):
        prompt_formats_for(checkpoint["ckpt"], tokenizer, ["xml"])


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_final_answer_reads_the_final_channel(tokenizer):
    analysis = "<|channel|>analysis<|message|>NOI over debt service<|end|><|start|>assistant"
    answer = final_answer(_ids(tokenizer, analysis + "<|channel|>final<|message|>DSCR: 1.25<|return|>"), tokenizer)
    assert (answer.text.replace(" ", ""), answer.has_final_channel, answer.terminated) == ("DSCR:1.25", True, True)
    # Reasoning alone is no answer.
    missing = final_answer(_ids(tokenizer, analysis), tokenizer)
    assert (missing.text, missing.has_final_channel, missing.terminated) == ("", False, False)
    # An answer the token budget cut off: what there is, marked unterminated.
    cut = final_answer(_ids(tokenizer, analysis + "<|channel|>final<|message|>DSCR: 1.2"), tokenizer)
    assert (cut.text.replace(" ", ""), cut.has_final_channel, cut.terminated) == ("DSCR:1.2", True, False)
    # A final channel opened with nothing after it yet.
    bare = final_answer(_ids(tokenizer, analysis + "<|channel|>final"), tokenizer)
    assert not bare.has_final_channel
    # The last final channel counts; a constrained header's first word names the channel.
    two = ("<|channel|>final<|message|>DSCR: 9<|end|><|start|>assistant"
           "<|channel|>final <|constrain|>json<|message|>LTV: 75<|call|>")
    later = final_answer(_ids(tokenizer, two), tokenizer)
    assert later.text.replace(" ", "") == "LTV:75" and later.terminated
    # The analysis channel never leaks into the answer, even when it holds numbers.
    leaked = final_answer(_ids(tokenizer, "<|channel|>analysis<|message|>DSCR: 3<|end|>"), tokenizer)
    assert leaked.text == ""


def test_baselines_report_both_prompt_formats_side_by_side(checkpoint, tmp_path):
    """Run from the checkpoint's parent with relative paths: both formats in one report, chat answers
    read from the final channel and stopped at the end of the turn."""
    import os

    out = tmp_path / "base"
    cwd = os.getcwd()
    os.chdir(checkpoint["root"])
    try:
        assert baselines_cli.main(["--model", "ckpt", "--data", "data/eval.json", "--n", "3", "--new-tokens", "5",
                                   "--styles", "zeroshot", "structured", "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)
    res = json.loads((out / "baselines.json").read_text())
    assert set(res) == {"raw", "chat"}
    assert res["raw"]["zeroshot"]["reference"]["ltv"]["n"] == 3
    assert 0.0 <= res["chat"]["structured"]["final_channel_share"] <= 1.0
    gens = json.loads((out / "generations.json").read_text())
    chat_tokenizer = Tokenizer.from_file(str(checkpoint["ckpt"] / "tokenizer.json"))
    stops = ("<|return|>", "<|call|>")
    for g in gens["chat"]["zeroshot"]:
        assert set(g) >= {"id", "text", "completion", "final_channel"}
        # Nothing after an end-of-turn token is kept.
        for stop in stops:
            if stop in g["completion"]:
                assert g["completion"].endswith(stop)
        if not g["final_channel"]:
            assert g["text"] == ""
    assert all("completion" not in g for g in gens["raw"]["zeroshot"])
    assert chat_tokenizer.token_to_id("<|return|>") is not None
    report = (out / "baselines.md").read_text()
    assert "within 10% (raw)" in report and "within 10% (chat)" in report and "final channel" in report


def test_generation_stops_at_any_of_several_end_of_turn_tokens(checkpoint):
    import numpy as np

    from hmoe_jax.checkpoint.loading import from_pretrained
    from hmoe_jax.model.generate import generate

    model = from_pretrained(checkpoint["ckpt"])
    prompt = np.array([[5, 6, 7, 8]], np.int32)
    free = np.asarray(generate(model, prompt, max_new_tokens=6))[0].tolist()
    stop = free[2]
    first = free.index(stop)
    unused = next(i for i in range(CONFIG["vocab_size"]) if i not in free)
    stopped = np.asarray(generate(model, prompt, max_new_tokens=6, eos_token_id=(unused, stop), pad_token_id=0))
    assert stopped[0, :first + 1].tolist() == free[:first + 1]
    assert (stopped[0, first + 1:] == 0).all()


def test_latency_times_chat_prompts_too(checkpoint):
    from hmoe_jax.evaluation.latency import measure_latency, report_markdown

    raw = measure_latency(checkpoint["ckpt"], n_prompts=2, new_tokens=2, torch_reference=False)
    chat = measure_latency(checkpoint["ckpt"], n_prompts=2, new_tokens=2, torch_reference=False, prompt_format="chat")
    assert (raw["prompt_format"], chat["prompt_format"]) == ("raw", "chat")
    assert chat["prompt_tokens"] > raw["prompt_tokens"]  # the template's system and turn tokens
    assert "Prompts: chat" in report_markdown(chat)


def test_a_chat_answer_ends_at_the_end_of_its_turn(tokenizer):
    """What generation leaves after a stop token (padding, or tokens of a row that ran on) is not read."""
    from hmoe_jax.evaluation.baselines import read_answer

    stop = (tokenizer.token_to_id("<|return|>"), tokenizer.token_to_id("<|call|>"))
    ids = _ids(tokenizer, "<|channel|>final<|message|>DSCR: 1.2<|return|>") + [0, 0] + _ids(tokenizer, "LTV: 9")
    answer = read_answer(ids, tokenizer, ChatFormat("", None, {}), stop)
    assert answer.completion.endswith("<|return|>") and "LTV" not in answer.completion
    assert answer.text.replace(" ", "") == "DSCR:1.2" and answer.final_channel and answer.terminated
    # A header cut short by another structure token is no channel; a message runs to the budget's end.
    broken = _ids(tokenizer, "<|channel|>final<|end|><|start|>assistant<|message|>LTV: 5")
    assert not read_answer(broken, tokenizer, ChatFormat("", None, {}), stop).final_channel
    budget = _ids(tokenizer, "<|channel|>final<|message|>LTV: 7")
    cut = read_answer(budget, tokenizer, ChatFormat("", None, {}), stop)
    assert cut.final_channel and not cut.terminated and cut.text.replace(" ", "") == "LTV:7"
    # Raw prompts: the whole decoded generation.
    assert read_answer(_ids(tokenizer, "DSCR 2"), tokenizer, None, None).completion is None
