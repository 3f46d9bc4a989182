"""The "gaze_sdpa" attention: captured rows equal eager `output_attentions`, and nothing changes when idle."""

from dataclasses import dataclass, field

import pytest
import torch

from gaze.attention import Hook, active
from gaze.models import load
from gaze.prompts import chat_text
from gaze.scoring import RowRecorder


@dataclass
class StepRecorder(Hook):
    """Appends every forward's last-row attention, per layer."""

    steps: list = field(default_factory=list)

    def on_forward(self, input_ids):
        self.steps.append({})

    def wants(self, layer):
        return True

    def record(self, layer, rows, value):
        self.steps[-1][layer] = rows


@pytest.fixture(scope="module")
def eager(tiny_path):
    return load(str(tiny_path), device="cpu", attn_implementation="eager")


def _inputs(loaded, image, questions, padding_side="left"):
    proc = loaded.processor
    proc.tokenizer.padding_side = padding_side
    texts = [chat_text(proc, q) for q in questions]
    return dict(proc(text=texts, images=[image] * len(texts), return_tensors="pt", padding=True))


def test_idle_gaze_attention_is_plain_sdpa(loaded, tiny_path, strip_for):
    sdpa = load(str(tiny_path), device="cpu", attn_implementation="sdpa")
    plain = sdpa.model
    plain.set_attn_implementation({"text_config": "sdpa"})
    assert plain.config.get_text_config()._attn_implementation == "sdpa"
    assert loaded.model.config.get_text_config()._attn_implementation == "gaze_sdpa"
    patch = loaded.family.merged_patch(loaded.processor)
    x = _inputs(loaded, strip_for(patch).image, ["What is in the 2nd panel?"])
    with torch.no_grad():
        a = loaded.model(**x).logits
        b = plain(**x).logits
    assert torch.equal(a, b)


def test_rows_equal_eager_with_gqa_and_padding(loaded, eager, strip_for):
    cfg = loaded.model.config.get_text_config()
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # GQA is exercised
    patch = loaded.family.merged_patch(loaded.processor)
    x = _inputs(loaded, strip_for(patch).image, ["Hi?", "What is happening in the 3rd panel from the left?"])
    assert int((x["attention_mask"] == 0).sum()) > 0  # padding is exercised
    rec = RowRecorder()
    with torch.no_grad(), active(rec):
        loaded.model(**x)
        ref = eager.model(**x, output_attentions=True).attentions
    for layer, att in enumerate(ref):
        diff = (rec.records[layer] - att[:, :, -1, :].float()).abs().max()
        assert diff <= 1e-5, (layer, float(diff))


@dataclass
class MatrixRecorder(Hook):
    """Every layer's whole attention matrix (`ALL_ROWS`), as training's penalties ask for it."""

    records: dict = field(default_factory=dict)

    def wants(self, layer):
        return True

    def query_rows(self, query_len):
        from gaze.attention import ALL_ROWS

        return ALL_ROWS

    def record(self, layer, rows, value):
        self.records[layer] = rows


def test_the_whole_matrix_path_gives_eager_matrices_and_last_rows_to_every_hook(loaded, eager, strip_for):
    patch = loaded.family.merged_patch(loaded.processor)
    x = _inputs(loaded, strip_for(patch, seed=5).image, ["Hi?", "What is happening in the 3rd panel from the left?"])
    assert int((x["attention_mask"] == 0).sum()) > 0
    matrices, rows = MatrixRecorder(), RowRecorder()
    with torch.no_grad():
        with active(matrices, rows):  # one hook wants every row: each layer runs on the eager whole-matrix path
            ours = loaded.model(**x).logits
        ref = eager.model(**x, output_attentions=True)
    real = x["attention_mask"].bool()  # padded query rows are not compared (their rows are masked out anyway)
    assert (ours - ref.logits)[real].abs().max() <= 1e-4
    for layer, att in enumerate(ref.attentions):
        assert matrices.records[layer].shape == att.shape
        diff = (matrices.records[layer] - att.float()).abs().amax(dim=(1, 3))[real].max()
        assert diff <= 1e-5, (layer, float(diff))
        assert torch.equal(rows.records[layer], matrices.records[layer][:, :, -1, :])


def test_rows_equal_eager_during_generate(loaded, eager, strip_for):
    patch = loaded.family.merged_patch(loaded.processor)
    x = _inputs(loaded, strip_for(patch, seed=3).image, ["Describe this comic strip panel by panel."])
    rec = StepRecorder()
    with torch.no_grad():
        with active(rec):
            ours = loaded.model.generate(**x, max_new_tokens=5, do_sample=False)
        ref = eager.model.generate(**x, max_new_tokens=5, do_sample=False, output_attentions=True,
                                   return_dict_in_generate=True)
    assert torch.equal(ours, ref.sequences)
    assert len(rec.steps) == len(ref.attentions) == 5
    for step, (mine, theirs) in enumerate(zip(rec.steps, ref.attentions)):
        for layer, att in enumerate(theirs):
            diff = (mine[layer] - att[:, :, -1, :].float()).abs().max()
            assert diff <= 1e-5, (step, layer, float(diff))


def test_hooks_are_gone_after_the_block_even_on_error(loaded, strip_for):
    from gaze.attention import _ACTIVE

    rec = RowRecorder()
    with pytest.raises(RuntimeError):
        with active(rec):
            assert _ACTIVE.get() == (rec,)
            raise RuntimeError("boom")
    assert _ACTIVE.get() == ()


def test_prepare_is_idempotent_and_restore_undoes_it(tiny_path):
    from gaze.attention import IMPLEMENTATION, is_prepared, prepare, restore

    loaded = load(str(tiny_path), device="cpu")  # load prepares
    model = loaded.model
    embed = model.get_input_embeddings()
    assert is_prepared(model) and model.config.get_text_config()._attn_implementation == IMPLEMENTATION
    hooks = len(embed._forward_pre_hooks)
    prepare(model)
    assert len(embed._forward_pre_hooks) == hooks  # idempotent: no second hook
    restore(model)
    assert not is_prepared(model) and len(embed._forward_pre_hooks) == hooks - 1
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert not any(k.startswith("_gaze") for k in vars(model))  # nothing stored on the model
