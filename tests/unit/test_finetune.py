"""Fine-tuning: tiny runs of a few steps that save loadable folders and resume exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, Blip2ForConditionalGeneration, BlipForConditionalGeneration

from blipserve.finetune import FinetuneConfig, finetune, scenes
from blipserve.finetune import data as data_mod
from blipserve.finetune import train as train_mod
from blipserve.finetune.build import make_bundle
from blipserve.finetune.collate import IGNORE, collate
from blipserve.finetune.data import Example, read_rows
from blipserve.finetune.metrics import corpus_bleu, exact_match

TINY: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_heads": 2,
    "vision_layers": 1,
    "text_layers": 1,
    "qformer_layers": 1,
    "num_query_tokens": 4,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 1,
    "num_threads": 1,
    "progress": False,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scenes.write_imagefolder(tmp_path_factory.mktemp("scenes"), seed=1, n=3)


def _cfg(init: str, data: Path, out: Path, **over: Any) -> FinetuneConfig:
    values = {
        "init": init,
        "data": str(data),
        "eval_data": str(data),
        "eval_examples": 4,
        "output_dir": str(out),
        "max_steps": 3,
        "eval_every": 0,
        "save_every": 0,
        **TINY,
    }
    values.update(over)
    return FinetuneConfig(**values)


@pytest.mark.heavy  # training
def test_blip_trains_saves_and_reloads(scene_dir: Path, tmp_path: Path) -> None:
    out = finetune(_cfg("config:blip", scene_dir, tmp_path / "blip"))
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert summary["steps"] == 3
    assert {"exact", "bleu4"} <= set(summary["final_eval"])
    processor = AutoProcessor.from_pretrained(out)
    model = BlipForConditionalGeneration.from_pretrained(out)
    image = scenes.scene_at(0, 0).image
    ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=5)
    assert ids.shape[0] == 1
    assert ids.shape[1] <= 6
    assert isinstance(processor.decode(ids[0], skip_special_tokens=True), str)


@pytest.mark.heavy  # training
def test_blip2_trains_saves_and_reloads(scene_dir: Path, tmp_path: Path) -> None:
    out = finetune(_cfg("config:blip2", scene_dir, tmp_path / "blip2"))
    summary = json.loads((out / "finetune_summary.json").read_text())
    assert {"caption_exact", "answer_exact"} <= set(summary["final_eval"])
    processor = AutoProcessor.from_pretrained(out)
    assert processor.num_query_tokens == 4
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_id
    image = scenes.scene_at(0, 0).image
    inputs = processor(
        images=image, text="Question: what color is the circle? Answer:", return_tensors="pt"
    )
    assert inputs["input_ids"][0, :4].tolist() == [image_id] * 4
    ids = model.generate(**inputs, max_new_tokens=3)
    assert ids.shape[1] <= inputs["input_ids"].shape[1] + 3
    caption = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=3)
    assert caption.shape[0] == 1


@pytest.mark.heavy  # training
def test_freeze_language_model(scene_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg("config:blip2", scene_dir, tmp_path / "b", eval_data="")
    bundle = make_bundle(cfg)
    before = {k: v.clone() for k, v in bundle.model.language_model.state_dict().items()}
    init = tmp_path / "init"
    bundle.model.save_pretrained(init)
    bundle.processor.save_pretrained(init)
    out = finetune(_cfg(str(init), scene_dir, tmp_path / "f", freeze_language_model=True))
    after = Blip2ForConditionalGeneration.from_pretrained(out).language_model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    with pytest.raises(ValueError, match="BLIP-2"):
        finetune(_cfg("config:blip", scene_dir, tmp_path / "x", freeze_language_model=True))


class Interrupted(Exception):
    pass


@pytest.mark.heavy  # training
def test_resume_continues_from_the_last_checkpoint(
    scene_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    over = {"max_steps": 4, "save_every": 2, "eval_data": ""}
    straight = finetune(_cfg("config:blip", scene_dir, tmp_path / "straight", **over))

    # Kill the second run while it works on step 3 (after the step-2 checkpoint).
    real_collate = collate
    calls: list[int] = []

    def dying_collate(bundle: Any, batch: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return real_collate(bundle, batch)

    monkeypatch.setattr(train_mod, "collate", dying_collate)
    cfg = _cfg("config:blip", scene_dir, tmp_path / "resumed", **over)
    with pytest.raises(Interrupted):
        finetune(cfg)
    assert train_mod.latest_checkpoint(cfg.checkpoints) == cfg.checkpoints / "step-2"
    assert not (tmp_path / "resumed" / "model.safetensors").exists()

    # Resume: only steps 3 and 4 run, on the examples the first run would have seen.
    seen: list[int] = []

    def counting_collate(bundle: Any, batch: Any) -> Any:
        seen.append(1)
        return real_collate(bundle, batch)

    monkeypatch.setattr(train_mod, "collate", counting_collate)
    resumed = finetune(cfg)
    assert len(seen) == 2
    summary = json.loads((resumed / "finetune_summary.json").read_text())
    assert summary["steps"] == 4
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


@pytest.mark.heavy  # training
def test_checkpoints_are_pruned(scene_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        "config:blip",
        scene_dir,
        tmp_path,
        max_steps=3,
        save_every=1,
        keep_checkpoints=1,
        eval_data="",
    )
    finetune(cfg)
    assert [p.name for p in cfg.checkpoints.iterdir()] == ["step-3"]


def test_collate_masks_prompt_and_padding(scene_dir: Path) -> None:
    image = Image.new("RGB", (64, 64))
    prompt = "Question: what color is the circle? Answer:"
    batch = [Example(image, "red", prompt), Example(image, "a small red circle")]
    bundle = make_bundle(_cfg("config:blip2", scene_dir, scene_dir, eval_data=""))
    out = collate(bundle, batch)
    tokenizer = bundle.processor.tokenizer
    q = bundle.model.config.num_query_tokens
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    for row, ex in enumerate(batch):
        labels = out["labels"][row]
        assert (labels[:q] == IGNORE).all()  # image placeholders
        kept = labels[labels != IGNORE].tolist()
        assert kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept, skip_special_tokens=True) == ex.text
    # The model input up to the answer is exactly what the processor builds for the prompt.
    built = bundle.processor(images=image, text=prompt)["input_ids"][0]
    assert out["input_ids"][0, : len(built)].tolist() == list(built)

    blip = make_bundle(_cfg("config:blip", scene_dir, scene_dir, eval_data=""))
    out = collate(blip, [Example(image, "a small red circle"), Example(image, "red", "a")])
    assert out["input_ids"][0, 0] == blip.model.config.text_config.bos_token_id
    assert out["labels"][0, 0] == IGNORE
    kept = out["labels"][1][out["labels"][1] != IGNORE].tolist()
    assert blip.processor.tokenizer.decode(kept, skip_special_tokens=True) == "red"


def test_read_rows_from_csv(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "data.csv").write_text("file_name,text,prompt\nx.png,a red circle,\n")
    rows = read_rows(tmp_path / "data.csv")
    assert rows[0].text == "a red circle"
    assert rows[0].prompt is None
    (tmp_path / "bad.csv").write_text("file_name,text\nmissing.png,x\n")
    with pytest.raises(ValueError, match="does not exist"):
        read_rows(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="metadata"):
        read_rows(tmp_path)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        FinetuneConfig(data="synthetic")
    with pytest.raises(ValueError, match="multiple"):
        FinetuneConfig(max_steps=1, image_size=30, patch_size=8)


def test_metrics() -> None:
    refs = ["a small red circle left of a large blue square", "red"]
    assert exact_match(refs, refs) == 1.0
    assert exact_match(["A  small red circle left of a large blue square", "blue"], refs) == 0.5
    assert corpus_bleu(refs, refs) == pytest.approx(1.0)
    assert corpus_bleu(["a b c d"], ["e f g h"]) == 0.0
    partial = corpus_bleu(["a small red circle left of a large blue"], refs[:1])
    assert 0.0 < partial < 1.0


@pytest.mark.heavy  # training
def test_resume_with_a_changed_recipe_warns(
    scene_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    over: dict[str, Any] = {"max_steps": 2, "save_every": 1, "eval_data": ""}
    finetune(_cfg("config:blip", scene_dir, tmp_path, **over))
    with caplog.at_level("WARNING", logger="blipserve.finetune.train"):
        finetune(_cfg("config:blip", scene_dir, tmp_path, **{**over, "max_steps": 3}))
    assert "max_steps: 2 -> 3" in caplog.text


def test_vision_init_copies_the_image_encoder(scene_dir: Path, tmp_path: Path) -> None:
    blip = make_bundle(_cfg("config:blip", scene_dir, tmp_path, seed=1))
    blip.model.save_pretrained(tmp_path / "blip")
    blip.processor.save_pretrained(tmp_path / "blip")
    blip2 = make_bundle(
        _cfg("config:blip2", scene_dir, tmp_path, vision_init=str(tmp_path / "blip"))
    )
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = blip.model.vision_model(pixel_values=pixels).last_hidden_state
        got = blip2.model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(got, want)
    small = make_bundle(_cfg("config:blip", scene_dir, tmp_path, hidden_size=16))
    small.model.save_pretrained(tmp_path / "small")
    small.processor.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="does not match"):
        make_bundle(_cfg("config:blip2", scene_dir, tmp_path, vision_init=str(tmp_path / "small")))


def test_qformer_init_copies_the_text_decoder_layers(scene_dir: Path, tmp_path: Path) -> None:
    blip = make_bundle(_cfg("config:blip", scene_dir, tmp_path, seed=1, text_layers=2))
    blip.model.save_pretrained(tmp_path / "blip")
    blip.processor.save_pretrained(tmp_path / "blip")
    blip2 = make_bundle(
        _cfg(
            "config:blip2",
            scene_dir,
            tmp_path,
            qformer_layers=2,
            qformer_init=str(tmp_path / "blip"),
        )
    )
    decoder = blip.model.text_decoder.bert
    for i, layer in enumerate(blip2.model.qformer.encoder.layer):
        source = decoder.encoder.layer[i]
        pairs = [
            (layer.attention.attention.query.weight, source.attention.self.query.weight),
            (layer.attention.output.dense.bias, source.attention.output.dense.bias),
            (layer.crossattention.attention.key.weight, source.crossattention.self.key.weight),
            (layer.intermediate_query.dense.weight, source.intermediate.dense.weight),
            (layer.output_query.LayerNorm.weight, source.output.LayerNorm.weight),
        ]
        for got, want in pairs:
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(
        blip2.model.qformer.layernorm.bias, decoder.embeddings.LayerNorm.bias
    )

    deeper = _cfg(
        "config:blip2", scene_dir, tmp_path, qformer_layers=3, qformer_init=str(tmp_path / "blip")
    )
    with pytest.raises(ValueError, match="fewer than"):
        make_bundle(deeper)
    with pytest.raises(ValueError, match="new BLIP-2"):
        make_bundle(_cfg("config:blip", scene_dir, tmp_path, qformer_init=str(tmp_path / "blip")))
    with pytest.raises(ValueError, match="apply to new models"):
        make_bundle(
            _cfg(str(tmp_path / "blip"), scene_dir, tmp_path, qformer_init=str(tmp_path / "blip"))
        )
    blip2.model.save_pretrained(tmp_path / "blip2")
    blip2.processor.save_pretrained(tmp_path / "blip2")
    with pytest.raises(ValueError, match="not a BLIP captioning model"):
        make_bundle(_cfg("config:blip2", scene_dir, tmp_path, qformer_init=str(tmp_path / "blip2")))


def test_question_weights_shape_the_synthetic_mix() -> None:
    def exists_share(weights: dict[str, float] | None) -> float:
        source = data_mod.SceneSource(scenes.TRAIN_SEED, caption_fraction=0.0, kind_weights=weights)
        prompts = [source.example(i).prompt or "" for i in range(600)]
        return sum("is there a" in p for p in prompts) / len(prompts)

    uniform = exists_share(None)  # one question per kind, 7 kinds
    assert 0.09 < uniform < 0.20
    assert 0.25 < exists_share({"exists": 3.0}) < 0.42  # 3/9
    assert exists_share({"exists": 0.0}) == 0.0
    cfg = FinetuneConfig(max_steps=1, question_weights="exists=3, count=0.5")
    assert cfg.kind_weights() == {"exists": 3.0, "count": 0.5}
    for bad in ("exist=3", "exists", "exists=-1", "exists=x"):
        with pytest.raises(ValueError, match="question_weights"):
            FinetuneConfig(max_steps=1, question_weights=bad)


def test_questions_per_image_groups_a_scene_with_its_questions() -> None:
    source = data_mod.SceneSource(scenes.TRAIN_SEED, questions_per_image=3)
    for index in range(5):
        rows = [source.example(4 * index + slot) for slot in range(4)]
        scene = scenes.scene_at(scenes.TRAIN_SEED, index)
        assert rows[0].prompt is None
        assert rows[0].text == scene.caption
        assert len({ex.image_key for ex in rows}) == 1
        asked = {ex.prompt: ex.text for ex in rows[1:]}
        truth: dict[str | None, scenes.QA] = {qa.prompt: qa for qa in scene.qa}
        assert len(asked) == 3  # three different questions, each answered correctly
        assert all(truth[p].answer == answer for p, answer in asked.items())
        assert len({truth[p].kind for p in asked}) == 3
    assert source.example(4).image_key != source.example(0).image_key
    # Deterministic: a fresh source (e.g. after a resume) gives the same rows.
    again = data_mod.SceneSource(scenes.TRAIN_SEED, questions_per_image=3)
    assert [again.example(i).prompt for i in range(12)] == [
        source.example(i).prompt for i in range(12)
    ]
    with pytest.raises(ValueError, match="questions_per_image"):
        FinetuneConfig(max_steps=1, questions_per_image=-1)


def test_prompt_forms_vary_questions_and_ask_for_captions() -> None:
    assert not FinetuneConfig(max_steps=1).prompt_forms  # other runs unchanged
    source = data_mod.SceneSource(scenes.TRAIN_SEED, questions_per_image=3, prompt_forms=True)
    rows = [source.example(i) for i in range(4 * 40)]
    forms: set[str] = set()
    for index in range(40):
        scene = scenes.scene_at(scenes.TRAIN_SEED, index)
        caption, *asked = rows[4 * index : 4 * index + 4]
        assert caption.text == scene.caption
        if caption.prompt is not None:  # an open question, answered with the caption
            assert (
                caption.prompt.lower().rstrip().removesuffix(" answer:").removeprefix("question: ")
                in scenes.OPEN_QUESTIONS
            )
        truth = {qa.question: qa.answer for qa in scene.qa}
        for ex in asked:
            assert ex.prompt is not None
            words = " ".join(ex.prompt.lower().split())
            question = words.removeprefix("question: ").removesuffix(" answer:")
            assert truth[question] == ex.text
            forms.add(
                "question"
                if words.startswith("question:")
                else "answer"
                if words.endswith("answer:")
                else "bare"
            )
    assert forms == set(scenes.PROMPT_FORMS)
    assert 10 < sum(rows[4 * i].prompt is not None for i in range(40)) < 30
    # Seeded: a fresh source (e.g. after a resume) gives the same prompts.
    again = data_mod.SceneSource(scenes.TRAIN_SEED, questions_per_image=3, prompt_forms=True)
    assert [again.example(i).prompt for i in range(40)] == [ex.prompt for ex in rows[:40]]
    # One example per scene too.
    single = data_mod.SceneSource(scenes.TRAIN_SEED, caption_fraction=0.0, prompt_forms=True)
    assert any(not (single.example(i).prompt or "").startswith("Question:") for i in range(30))


def test_rows_sharing_an_image_share_its_features(scene_dir: Path) -> None:
    """One pass of each image for all its rows (and, packed, one language-model sequence
    per image) gives the same loss and gradients as separate rows."""
    bundle = make_bundle(_cfg("config:blip2", scene_dir, scene_dir, eval_data=""))
    source = data_mod.SceneSource(scenes.TRAIN_SEED, questions_per_image=2)
    batch = [source.example(i) for i in range(6)]  # two scenes, three rows each
    packed = collate(bundle, batch)
    assert packed["pixel_values"].shape[0] == 2
    assert packed["input_ids"].shape[0] == 2  # one sequence per image
    width = packed["input_ids"].shape[1]
    assert packed["attention_mask"].shape == (2, 1, width, width)
    assert "image_index" not in packed
    shared = collate(bundle, batch, pack=False)
    assert shared["pixel_values"].shape[0] == 2
    assert shared["image_index"].tolist() == [0, 0, 0, 1, 1, 1]
    separate = collate(bundle, [Example(ex.image, ex.text, ex.prompt) for ex in batch])
    assert "image_index" not in separate
    assert separate["pixel_values"].shape[0] == 6
    # Packing drops the repeated image tokens and the padding of short rows.
    assert packed["input_ids"].numel() < shared["input_ids"].numel()
    # ... but keeps every target token.
    assert int((packed["labels"] != IGNORE).sum()) == int((separate["labels"] != IGNORE).sum())

    def loss_and_grads(inputs: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
        bundle.model.zero_grad()
        loss = train_mod._loss(bundle.model, dict(inputs))
        torch.autograd.backward(loss)
        grads = [  # the Q-Former's queries and the language model's first layer
            bundle.model.query_tokens.grad,
            bundle.model.language_model.get_input_embeddings().weight.grad,
            next(bundle.model.language_model.model.decoder.layers[0].parameters()).grad,
        ]
        assert all(g is not None for g in grads)
        return float(loss.detach()), [g.clone() for g in grads if g is not None]

    b, grads_b = loss_and_grads(separate)
    for inputs in (packed, shared):
        a, grads_a = loss_and_grads(inputs)
        assert a == pytest.approx(b, rel=1e-5)
        for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
            torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)


@pytest.mark.heavy  # training
def test_blip2_trains_with_questions_per_image(tmp_path: Path) -> None:
    cfg = _cfg(
        "config:blip2",
        Path("synthetic"),
        tmp_path / "grouped",
        eval_data="",
        questions_per_image=3,
        batch_size=8,
        max_steps=2,
    )
    out = finetune(cfg)
    assert json.loads((out / "finetune_summary.json").read_text())["steps"] == 2


def test_score_reports_answers_by_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    from blipserve.finetune import evaluate

    examples = evaluate.heldout_examples(6, "blip2", every_question=True)
    kinds = {ex.kind for ex in examples if ex.prompt is not None}
    assert {"color", "count", "exists"} <= kinds
    assert all(ex.kind is None for ex in examples if ex.prompt is None)  # captions

    def predict(bundle: Any, batch: list[Example], **_: Any) -> list[str]:
        # Right about everything except existence, which it always gets wrong.
        return ["maybe" if ex.kind == "exists" else ex.text for ex in batch]

    monkeypatch.setattr(evaluate, "predict", predict)
    bundle = make_bundle(_cfg("config:blip2", Path("synthetic"), Path("unused"), eval_data=""))
    result = evaluate.score(bundle, examples)
    assert result["answer_exact/exists"] == 0.0
    assert result["answer_exact/color"] == result["answer_exact/count"] == 1.0
    assert {k for k in result if k.startswith("answer_exact/")} == {
        f"answer_exact/{k}" for k in kinds
    }
    assert 0.0 < result["answer_exact"] < 1.0


def test_score_forms_reports_each_prompt_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from blipserve.finetune import evaluate

    examples = evaluate.form_examples(4)
    assert {ex.form for ex in examples} == {*scenes.PROMPT_FORMS, "open"}
    opens = [ex for ex in examples if ex.form == "open"]
    assert len(opens) == 4
    assert all(ex.text.startswith("a ") for ex in opens)
    assert examples == evaluate.form_examples(4)  # seeded

    def predict(bundle: Any, batch: list[Example], **_: Any) -> list[str]:
        # Right about everything except bare questions.
        return ["" if ex.form == "bare" else ex.text for ex in batch]

    monkeypatch.setattr(evaluate, "predict", predict)
    result = evaluate.score_forms(object(), examples)  # type: ignore[arg-type]
    assert result["answer_exact/form:bare"] == 0.0
    assert result["answer_exact/form:question"] == result["answer_exact/form:answer"] == 1.0
    assert result["open_exact"] == 1.0
    assert result["open_n"] == 4.0
    assert result["answer_n/form:bare"] == sum(ex.form == "bare" for ex in examples)
