import pytest
import torch

from tasktune import infer
from tasktune.models import load_model
from tasktune.tasks import PromptBuilder
from tasktune.tasks import get_task
from tiny import sentiment_rows

ARCHS = ["llama", "gemma2", "gemma3"]


def prompts(builder, n=9):
    rows = [{"id": i, "text": s, "label": l, "fields": {"text": s}} for i, (s, l) in enumerate(sentiment_rows(n, seed=3))]
    return rows, [builder.encode(builder.render(r)) for r in rows]


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tiny_models):
    lm = load_model(str(tiny_models[request.param]), dtype="fp32")
    return lm, PromptBuilder(get_task("sst2"), lm.tokenizer)


def test_left_padding_and_positions():
    ids, mask = infer.left_pad([[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert infer.position_ids_from_mask(mask).tolist() == [[0, 0, 1], [0, 1, 2]]


def test_score_equals_full_forward_log_softmax(loaded):
    lm, builder = loaded
    rows, encoded = prompts(builder)
    token_ids = get_task("sst2").label_token_ids(builder, rows[0])
    scored = infer.score_tokens(lm.model, encoded, token_ids, lm.tokenizer.pad_token_id, batch_size=4)
    for i, ids in enumerate(encoded):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        expected = torch.log_softmax(logits, -1)[token_ids]
        torch.testing.assert_close(scored[i], expected, atol=1e-4, rtol=1e-4)


def test_batched_scoring_equals_single(loaded):
    lm, builder = loaded
    rows, encoded = prompts(builder)
    token_ids = get_task("sst2").label_token_ids(builder, rows[0])
    pad = lm.tokenizer.pad_token_id
    batched = infer.score_tokens(lm.model, encoded, token_ids, pad, batch_size=9)
    single = infer.score_tokens(lm.model, encoded, token_ids, pad, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_batched_generation_equals_single(loaded):
    lm, builder = loaded
    _, encoded = prompts(builder)
    batched = infer.generate(lm.model, lm.tokenizer, encoded, 4, batch_size=9).texts
    single = infer.generate(lm.model, lm.tokenizer, encoded, 4, batch_size=1).texts
    assert batched == single


def test_bf16_batched_close_to_single(tiny_models):
    lm = load_model(str(tiny_models["gemma3"]), dtype="bf16")
    builder = PromptBuilder(get_task("sst2"), lm.tokenizer)
    rows, encoded = prompts(builder)
    token_ids = get_task("sst2").label_token_ids(builder, rows[0])
    pad = lm.tokenizer.pad_token_id
    batched = infer.score_tokens(lm.model, encoded, token_ids, pad, batch_size=9)
    single = infer.score_tokens(lm.model, encoded, token_ids, pad, batch_size=1)
    torch.testing.assert_close(batched, single, atol=0.1, rtol=0.05)  # bf16 tolerance (DESIGN.md)


def test_first_token_probability_matches_a_forward_pass(loaded):
    lm, builder = loaded
    _, encoded = prompts(builder, n=3)
    token = 5
    probs = infer.generate(lm.model, lm.tokenizer, encoded, 2, batch_size=3, first_token_id=token).first_token_probs
    for ids, p in zip(encoded, probs):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        assert p == pytest.approx(torch.softmax(logits, -1)[token].item(), abs=1e-5)


def test_first_token_margin_is_the_logit_lead_and_decides_like_greedy(loaded):
    lm, builder = loaded
    _, encoded = prompts(builder, n=4)
    with torch.no_grad():
        last = [lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float() for ids in encoded]
    # One token greedy picks for some prompt, so both signs of the margin are checked.
    token = int(last[0].argmax())
    out = infer.generate(lm.model, lm.tokenizer, encoded, 2, batch_size=4, first_token_id=token)
    for logits, margin, top in zip(last, out.first_token_margins, out.first_token_is_top):
        others = torch.cat([logits[:token], logits[token + 1:]])
        assert margin == pytest.approx((logits[token] - others.max()).item(), abs=1e-4)
        assert (margin > 0) == top
    assert out.first_token_is_top[0] and out.first_token_margins[0] > 0


def test_multi_token_verbalizers_have_no_single_token_ids(tiny_llama, sst2_tsv, tmp_path, capsys):
    from tasktune.cli import main

    lm = load_model(str(tiny_llama), dtype="fp32")
    task = get_task("sst2", [" negative", " very positive"])
    builder = PromptBuilder(task, lm.tokenizer)
    row = {"id": 0, "text": "good", "label": 1, "fields": {"text": "good"}}
    assert task.label_token_ids(builder, row) is None
    assert [len(t) for t in task.verbalizer_tokens(builder, row)] == [1, 2]
    # The fast objectives need one token per label: refused in one line before training.
    assert main(["run", "sst2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", f"model={tiny_llama}", f"data.path={sst2_tsv}",
                 f"output_dir={tmp_path}", "name=m", "eval.verbalizers=[' negative', ' very positive']",
                 "train.objective=verbalizer"]) == 2
    assert "needs single-token verbalizers" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / ".m.partial").exists()


def test_parse():
    task = get_task("sst2")
    assert task.parse(" positive") == 1
    assert task.parse(" Negative.\nQuestion") == 0
    assert task.parse(" neutral") is None
    assert task.parse("") is None
    assert task.parse(" the movie is positive") is None


def test_generation_with_frozen_head_restores_the_flag(tiny_llama):
    lm = load_model(str(tiny_llama), dtype="fp32")
    builder = PromptBuilder(get_task("sst2"), lm.tokenizer)
    _, encoded = prompts(builder, n=4)
    before = infer.generate(lm.model, lm.tokenizer, encoded, 3, batch_size=4).texts
    head = lm.model.get_output_embeddings().weight
    head.requires_grad_(False)  # as after LoRA wrapping or peft loading
    after = infer.generate(lm.model, lm.tokenizer, encoded, 3, batch_size=4).texts
    assert after == before and head.requires_grad is False
