"""Models by name, plain Python (issue 28): which names are hub names, which files a repository's
listing gives (quantizations, split parts, HF folders), and how the API server lists a model its
worker is still downloading."""

from __future__ import annotations

import pytest

from llmrelay.api.models.serving import ModelServing
from llmrelay.api.table import WorkerTable
from llmrelay.worker import hub
from llmrelay.worker.download import downloading_status
from llmrelay.worker.models import hub_ref

MiB = 1 << 20


def test_hub_names_and_what_is_not_one() -> None:
    assert hub.parse_ref("Qwen/Qwen2.5-7B-Instruct") == hub.HubRef("Qwen/Qwen2.5-7B-Instruct")
    assert hub.parse_ref("hf.co/bartowski/X-GGUF:q4_k_m") == hub.HubRef("bartowski/X-GGUF", "q4_k_m")
    assert hub.parse_ref("org/name:Q8_0").name == "name:Q8_0"
    for text in ("./models/x", "/abs/path", "~/m", "plainname", "a/b/c/d/e"):
        assert hub.parse_ref(text) is None
    assert hub_ref("smollm2") is None  # a bundled alias


@pytest.mark.parametrize("path, quant", [
    ("Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Q4_K_M"), ("qwen2.5-7b-instruct-q8_0.gguf", "Q8_0"),
    ("model.Q5_K_S.gguf", "Q5_K_S"), ("x-UD-Q4_K_XL-00001-of-00003.gguf", "Q4_K_XL"),
    ("Q4_K_M/model-00002-of-00002.gguf", "Q4_K_M"), ("m-IQ2_XXS.gguf", "IQ2_XXS"),
    ("m-BF16.gguf", "BF16"), ("m-f16.gguf", "F16"), ("model.gguf", None)])
def test_quantization_from_a_file_name(path: str, quant: str | None) -> None:
    assert hub.quant_of(path) == quant


def test_default_is_q4_k_m_else_the_smallest() -> None:
    files = {"m-Q8_0.gguf": 8 * MiB, "m-Q4_K_M.gguf": 5 * MiB, "m-Q2_K.gguf": 3 * MiB,
             "README.md": 10}
    assert hub.plan(hub.HubRef("o/m"), files).main == "m-Q4_K_M.gguf"
    del files["m-Q4_K_M.gguf"]
    assert hub.plan(hub.HubRef("o/m"), files).main == "m-Q2_K.gguf"
    assert hub.plan(hub.HubRef("o/m", "q8_0"), files).files == {"m-Q8_0.gguf": 8 * MiB}


def test_a_vision_projector_comes_with_the_model() -> None:
    """A GGUF repository's `mmproj*.gguf` in the model's folder is fetched with it (F16 first,
    else the model's own quantization, else the first by name); it is never the model."""
    files = {"m-Q8_0.gguf": 8 * MiB, "m-Q4_K_M.gguf": 5 * MiB, "mmproj-m-f16.gguf": MiB,
             "mmproj-m-Q8_0.gguf": MiB // 2, "README.md": 10}
    plan = hub.plan(hub.HubRef("o/m"), files)
    assert plan.main == "m-Q4_K_M.gguf"
    assert plan.files == {"m-Q4_K_M.gguf": 5 * MiB, "mmproj-m-f16.gguf": MiB}
    assert plan.patterns == ["m-Q4_K_M.gguf", "mmproj-m-f16.gguf"]
    del files["mmproj-m-f16.gguf"]
    assert set(hub.plan(hub.HubRef("o/m", "Q8_0"), files).files) == {"m-Q8_0.gguf",
                                                                      "mmproj-m-Q8_0.gguf"}
    nested = {"Q4_K_M/m-Q4_K_M.gguf": 5 * MiB, "mmproj-f16.gguf": MiB}  # not in its folder
    assert set(hub.plan(hub.HubRef("o/m"), nested).files) == {"Q4_K_M/m-Q4_K_M.gguf"}


def test_split_parts_go_together_and_must_all_be_there() -> None:
    files = {f"Q4_K_M/m-Q4_K_M-0000{i}-of-00003.gguf": MiB for i in (1, 2, 3)}
    p = hub.plan(hub.HubRef("o/m"), files)
    assert p.main.endswith("00001-of-00003.gguf") and len(p.files) == 3
    del files["Q4_K_M/m-Q4_K_M-00002-of-00003.gguf"]
    with pytest.raises(hub.HubError, match="2 of its 3 parts"):
        hub.plan(hub.HubRef("o/m"), files)


def test_ambiguous_repositories_list_their_candidates() -> None:
    with pytest.raises(hub.HubError, match=r"several GGUF models.*a\.gguf.*b\.gguf"):
        hub.plan(hub.HubRef("o/m"), {"a.gguf": MiB, "b.gguf": 2 * MiB})


def test_an_hf_folder_leaves_other_formats_behind() -> None:
    files = {"config.json": 1, "model.safetensors": MiB, "pytorch_model.bin": MiB,
             "onnx/model.onnx": MiB, "tokenizer.json": 1, "1_Pooling/config.json": 1,
             "model-Q4_K_M.gguf": MiB}
    p = hub.plan(hub.HubRef("o/m"), files)
    assert p.kind == "hf"
    assert sorted(p.files) == ["1_Pooling/config.json", "config.json", "model.safetensors",
                               "tokenizer.json"]
    assert hub.plan(hub.HubRef("o/m", "Q4_K_M"), files).main == "model-Q4_K_M.gguf"
    with pytest.raises(hub.HubError, match="not a GGUF repository"):
        hub.plan(hub.HubRef("o/m", "Q4_K_M"), {"config.json": 1, "model.safetensors": 1})


def test_a_downloading_worker_is_listed_and_refused_with_retry_after() -> None:
    table = WorkerTable()
    status = downloading_status(["big"], hub.Progress("o/big", 25, 100))
    table.apply({"workers": [{"name": "http://w:1", "model_names": [], "status": status,
                              "registered_at": 1, "last_heart_beat": 1}]})
    listed = {m.id: m for m in ModelServing(table).list().data}
    assert listed["big"].state == "downloading"
    assert listed["big"].download["percent"] == 25.0  # type: ignore[attr-defined]
    from llmrelay.api.errors import APIError

    with pytest.raises(APIError) as e:
        table.check_model("big")
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    assert "25%" in str(e.value.body())
    assert table.pick("big") is None
