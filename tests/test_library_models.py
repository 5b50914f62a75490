"""Teachers and students as users have them: torchvision and timm models by name, saved the ways users save them
(a state_dict, TorchScript), scored on real photos and distilled into, with nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curate.errors import UserError
from curate.pools import open_pool, read_batch
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from curate.teachers import load_teacher
from tests.conftest import PHOTO

timm = pytest.importorskip("timm")

# tiny random-init models: the architecture is the library's, the size keeps the test fast
MODELS = {"torchvision:resnet18": lambda: __import__("torchvision").models.resnet18(num_classes=10),
          "timm:resnet10t": lambda: timm.create_model("resnet10t", num_classes=10)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops of a real photograph at 64 to 224 pixels, and matplotlib's other sample images."""
    folder = tmp_path_factory.mktemp("photos")
    photo = Image.open(PHOTO).convert("RGB")
    for i, side in enumerate((64, 96, 160, 224, 300, 200)):
        left, top = (37 * i) % (photo.width - side), (53 * i) % (photo.height - side)
        photo.crop((left, top, left + side, top + side)).save(folder / f"crop{i}.jpg")
    for name in ("Minduka_Present_Blue_Pack.png", "logo2.png"):
        Image.open(PHOTO.parent / name).save(folder / name)
    return folder


@pytest.fixture(autouse=True)
def _empty_model_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights in any cache: a test that needs a download fails instead of reaching out."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript is deprecated, still handed to us
@pytest.mark.parametrize("name", list(MODELS))
def test_library_teacher_from_a_state_dict_scores_real_photos(name: str, photos: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    _settle_batchnorm(model)
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"image_size": 64}))
    out = tmp_path / "scored"
    score_pool(ScoreConfig(teacher=Path(name), teacher_weights=weights, teacher_meta=meta, pool="folder",
                           root=photos, out=out, batch_size=4, workers=0, reference_count=64))
    table = pq.read_table(out)
    assert table.num_rows == 8
    assert np.isfinite(table["ood_bn_mean"].to_numpy()).all() and np.isfinite(table["relatedness"].to_numpy()).all()
    assert table.schema.field("embedding").type.list_size == model.state_dict()[_classifier_key(model)].shape[1]

    teacher = load_teacher(name, weights=weights, meta_overrides={"image_size": 64})
    assert teacher.spec.mean == pytest.approx((0.485, 0.456, 0.406))  # the library's own normalisation
    batch = read_batch(open_pool("folder", photos), range(8), teacher.spec.geometry())
    with torch.inference_mode():
        expected = model.eval()(teacher.spec.normalize()(batch.images))  # the library model's own forward
    np.testing.assert_allclose(np.array(table["logits"].to_pylist(), dtype=np.float32), expected.numpy(),
                               rtol=1e-2, atol=2e-3)  # stored as float16

    # as users script it: the library model itself, no meta inside (given with --teacher-meta)
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(scripted))
    full_meta = tmp_path / "full-meta.json"
    full_meta.write_text(json.dumps({key: teacher.meta[key] for key in ("num_classes", "in_channels", "image_size",
                                                                         "resize_size", "interpolation", "mean",
                                                                         "std")}))
    out = tmp_path / "scored-scripted"
    score_pool(ScoreConfig(teacher=scripted, teacher_meta=full_meta, pool="folder", root=photos, out=out,
                           batch_size=4, workers=0, reference_count=64))
    again = pq.read_table(out)
    assert again.column_names == table.column_names
    for column in ("relatedness", "ood_bn_mean", "ood_bn_var", "ood_cos_class"):
        np.testing.assert_allclose(again[column].to_numpy(), table[column].to_numpy(), rtol=1e-4, atol=1e-4)


def _settle_batchnorm(model: torch.nn.Module) -> None:
    """Running statistics from a few forward passes, as a trained model has (fresh ones are 0 and 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, 64, 64))
    model.eval()


def _classifier_key(model: torch.nn.Module) -> str:
    return [k for k, v in model.state_dict().items() if k.endswith("weight") and v.ndim == 2][-1]


@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet10t"])
def test_library_teacher_without_weights_fails_in_one_line_saying_where(name: str) -> None:
    with pytest.raises(UserError, match="--teacher-weights") as error:
        load_teacher(name)
    assert "\n" not in str(error.value)
    if name.startswith("torchvision"):
        assert "resnet18-f37072fd.pth" in str(error.value)


def test_bad_library_names_are_user_errors(tmp_path: Path) -> None:
    for name, message in (("torchvision:resnet999", "no classification model"), ("timm:not_a_net", "no model"),
                          ("torchvision:resnet18:NOPE", "no weights NOPE")):
        with pytest.raises(UserError, match=message):
            load_teacher(name, weights=tmp_path / "w.pt") if "NOPE" not in name else load_teacher(name)
    not_weights = tmp_path / "w.pt"
    torch.save({"a": 1}, not_weights)
    with pytest.raises(UserError, match="does not hold a state_dict"):
        load_teacher("torchvision:resnet18", weights=not_weights)


@pytest.mark.parametrize("student", ["torchvision:mobilenet_v3_small", "timm:resnet10t"])
def test_library_students_distil_from_curated_shards(student: str, selected: Path, tmp_path: Path) -> None:
    from train.config import DistillConfig
    from train.distill import distill

    result = distill(DistillConfig(shards=selected, out=tmp_path / "run", student=student, steps=3, batch_size=16,
                                   workers=0, device="cpu", log_every=1))
    assert result["steps"] == 3 and (tmp_path / "run" / "student.pt").is_file()
    loaded = load_teacher(tmp_path / "run" / "student.pt")  # saved in the checkpoint layout, arch by name
    assert loaded.meta["arch"] == student
    assert loaded.model(torch.zeros(2, *loaded.spec.shape())).shape == (2, 10)


def test_imagenet_size_inputs_match_the_libraries_evaluation_transform(photos: Path) -> None:
    """Photos of 64 to 300 pixels read at a torchvision teacher's spec (shorter side to 256, centre 224, from its
    weights' metadata) give the pixels of torchvision's own evaluation transform, within resampling noise."""
    import torchvision

    from curate.spec import InputSpec
    from curate.zoo import LibraryModel

    spec = InputSpec.from_meta(LibraryModel.parse("torchvision:resnet18").meta(1000))
    assert (spec.image_size, spec.resize_size, spec.interpolation) == (224, 256, "bilinear")
    reference = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    pool = open_pool("folder", photos)
    crops = [i for i in range(len(pool)) if pool.key(i).endswith(".jpg")]
    batch = read_batch(pool, crops, spec.geometry())
    ours = spec.normalize()(batch.images)
    std = torch.tensor(spec.std).view(3, 1, 1)
    for k, key in enumerate(batch.keys):
        expected = reference(Image.open(photos / key).convert("RGB"))
        difference = ((expected - ours[k]) * std).abs()  # in [0, 1] units
        assert difference.mean() < 0.01 and difference.quantile(0.99) < 0.06, key


def test_a_library_teacher_labels_views_online_during_distillation(photos: Path, tmp_path: Path) -> None:
    from curate.query.export import ExportConfig, export_selection
    from curate.query.select import SelectConfig, Selector
    from train.config import DistillConfig
    from train.distill import distill

    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(MODELS["torchvision:resnet18"]().state_dict(), weights)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"image_size": 32, "resize_size": 36}))
    scored = tmp_path / "scored"
    score_pool(ScoreConfig(teacher=Path("torchvision:resnet18"), teacher_weights=weights, teacher_meta=meta,
                           pool="patches", root=photos, pool_options={"count": 64, "size": 48}, out=scored,
                           batch_size=32, workers=0, reference_count=64))
    Selector(SelectConfig(scored=scored, strategy="topk", budget=48, out=tmp_path / "sel.parquet")).run()
    export_selection(ExportConfig(scored=scored, selection=tmp_path / "sel.parquet", out=tmp_path / "selected",
                                  shard_rows=16, row_group_rows=16))
    common = dict(shards=tmp_path / "selected", student="resnet8", steps=2, batch_size=16, workers=0, device="cpu",
                  teacher=Path("torchvision:resnet18"))
    result = distill(DistillConfig(**common, out=tmp_path / "run", teacher_weights=weights, cutmix=1.0))
    assert result["steps"] == 2
    other = tmp_path / "other.pt"
    torch.save(MODELS["torchvision:resnet18"]().state_dict(), other)  # same architecture, other weights
    with pytest.raises(UserError, match="not the teacher that scored these shards"):
        distill(DistillConfig(**common, out=tmp_path / "run2", teacher_weights=other))


def test_a_checkpoint_may_name_a_library_architecture_with_its_own_state_dict(tmp_path: Path) -> None:
    """``{"arch": "torchvision:resnet18", "state_dict": <the library model's>, "meta": ...}`` loads, its meta
    completed from the library's."""
    torch.manual_seed(0)
    model = MODELS["torchvision:resnet18"]().eval()
    path = tmp_path / "teacher.pt"
    torch.save({"arch": "torchvision:resnet18", "state_dict": model.state_dict(), "meta": {"image_size": 64}}, path)
    teacher = load_teacher(path)
    assert (teacher.num_classes, teacher.spec.image_size, teacher.spec.in_channels) == (10, 64, 3)
    assert teacher.spec.resize_size == 73  # the library's crop fraction (224 of 256) kept at 64 pixels
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(teacher.model(x), model(x), atol=1e-5)
