"""The published PSPNet weights by name: where they are, what they expect, what they score.

``build_pspnet(weights="pspnet50_ade20k")`` goes through :func:`fetch`: it finds
the converted ``.keras`` file in the cache, or the source checkpoint (downloaded
with ``keras.utils.get_file`` where the source allows it, else placed there by
hand), converts it once and caches the result. The cache is
``$PSPNET_TF_WEIGHTS_DIR`` if set, else ``weights/`` in a source checkout, else
``<keras home>/models/pspnet_tf`` (``$KERAS_HOME`` or ``~/.keras``).

No source publishes checksums, so each entry's ``sha256`` is None ("unverified")
and the hash of the first download is recorded in ``<cache>/sha256.json``; a
later file with another hash is refused, as is a file that does not match an
entry's published ``sha256``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

from pspnet_tf.data.classes import DATASETS
from pspnet_tf.files import atomic_path, write_text
from pspnet_tf.model.network import get_metadata, resolve_preprocessing, set_metadata
from pspnet_tf.weights.convert import SOURCES, convert_checkpoint

_SEMSEG_URL = "https://drive.google.com/open?id=15wx9vOM0euyizq-M1uINgN0_wjVRf9J3"
_SEMSEG_TERMS = (
    "hszhao/semseg is MIT-licensed; no separate terms are stated for the released models; "
    "the dataset's terms of use apply"
)
_BUBBLIIIING_TERMS = (
    "no licence file in bubbliiiing/pspnet-pytorch (all rights reserved by default); "
    "trained on PASCAL VOC 2012 + SBD, whose terms of use apply"
)
_CAFFE_TERMS = (
    "no licence stated for the weights; hszhao/PSPNet code: Caffe/DeepLab BSD-style licence; "
    "the .npy conversion by Vladkryvoruchko/PSPNet-Keras-tensorflow (MIT)"
)
# hszhao/semseg README, Performance tables (mIoU, single-scale / multi-scale).
_SEMSEG_MIOU = {
    ("pspnet50", "ade20k"): (41.89, 42.84),
    ("pspnet101", "ade20k"): (43.10, 44.15),
    ("pspnet50", "voc"): (77.05, 78.02),
    ("pspnet101", "voc"): (79.07, 79.63),
    ("pspnet50", "cityscapes"): (77.30, 78.38),
    ("pspnet101", "cityscapes"): (78.63, 79.29),
}
_SEMSEG_DATA = {  # name suffix, crop size, epochs (checkpoint train_epoch_<epochs>.pth), split
    "ade20k": ("ade20k", 473, 100, "ADE20K val"),
    "voc": ("voc2012", 473, 50, "VOC 2012 val"),
    "cityscapes": ("cityscapes", 713, 200, "Cityscapes fine val"),
}


def _semseg_entries():
    entries = {}
    for (net, dataset), (ss, ms) in _SEMSEG_MIOU.items():
        suffix, crop, epochs, split = _SEMSEG_DATA[dataset]
        name = f"{net}_{suffix}"
        entries[name] = {
            "source": "semseg",
            "description": f"PSPNet-{net[6:]} on {split.rsplit(' ', 1)[0]}, official PyTorch "
            "release (hszhao/semseg)",
            "url": _SEMSEG_URL,
            "download": "manual",
            "file_in_source": f"exp/{suffix}/{net}/model/train_epoch_{epochs}.pth",
            "filename": f"{name}.pth",
            "sha256": None,
            "licence": _SEMSEG_TERMS,
            "dataset": dataset,
            "backbone": "resnet" + net[6:],
            "crop_size": crop,
            "output_stride": 8,
            "reported": {"split": split, "miou_single_scale": ss, "miou_multi_scale": ms},
        }
    return entries


PRETRAINED = {
    **_semseg_entries(),
    "bubbliiiing_mobilenetv2_voc": {
        "source": "bubbliiiing",
        "description": "PSPNet-MobileNetV2 on VOC 2012 + SBD (bubbliiiing/pspnet-pytorch)",
        "url": "https://github.com/bubbliiiing/pspnet-pytorch/releases/download/v1.0/"
        "pspnet_mobilenetv2.pth",
        "download": "direct",
        "filename": "bubbliiiing_pspnet_mobilenetv2.pth",
        "sha256": None,
        "licence": _BUBBLIIIING_TERMS,
        "dataset": "voc",
        "backbone": "mobilenetv2",
        "crop_size": 473,
        "output_stride": 16,
        "reported": {"split": "VOC 2012 val", "miou_single_scale": 68.59},
    },
    "bubbliiiing_resnet50_voc": {
        "source": "bubbliiiing",
        "description": "PSPNet-ResNet-50 on VOC 2012 + SBD (bubbliiiing/pspnet-pytorch)",
        "url": "https://github.com/bubbliiiing/pspnet-pytorch/releases/download/v1.0/"
        "pspnet_resnet50.pth",
        "download": "direct",
        "filename": "bubbliiiing_pspnet_resnet50.pth",
        "sha256": None,
        "licence": _BUBBLIIIING_TERMS,
        "dataset": "voc",
        "backbone": "resnet50",
        "crop_size": 473,
        "output_stride": 16,
        "reported": {"split": "VOC 2012 val", "miou_single_scale": 81.44},
    },
    "caffe_pspnet50_ade20k": {
        "source": "caffe",
        "description": "PSPNet-50 on ADE20K, original Caffe model (hszhao/PSPNet) as .npy",
        "url": "https://www.dropbox.com/s/ms8afun494dlh1t/pspnet50_ade20k.npy?dl=0",
        "download": "direct",
        "filename": "caffe_pspnet50_ade20k.npy",
        "sha256": None,
        "licence": _CAFFE_TERMS,
        "dataset": "ade20k",
        "backbone": "resnet50",
        "crop_size": 473,
        "output_stride": 8,
        "reported": {"split": "ADE20K val", "miou_single_scale": 41.68, "miou_multi_scale": 42.78},
    },
    "caffe_pspnet101_voc2012": {
        "source": "caffe",
        "description": "PSPNet-101 on VOC 2012 (COCO pre-trained), original Caffe model as .npy",
        "url": "https://www.dropbox.com/s/xkjmghsbn6sfj9k/pspnet101_voc2012.npy?dl=0",
        "download": "direct",
        "filename": "caffe_pspnet101_voc2012.npy",
        "sha256": None,
        "licence": _CAFFE_TERMS,
        "dataset": "voc",
        "backbone": "resnet101",
        "crop_size": 473,
        "output_stride": 8,
        "reported": {"split": "VOC 2012 test", "miou_multi_scale": 85.41},
    },
    "caffe_pspnet101_cityscapes": {
        "source": "caffe",
        "description": "PSPNet-101 on Cityscapes fine, original Caffe model as .npy",
        "url": "https://www.dropbox.com/s/b21j6hi6qql90l0/pspnet101_cityscapes.npy?dl=0",
        "download": "direct",
        "filename": "caffe_pspnet101_cityscapes.npy",
        "sha256": None,
        "licence": _CAFFE_TERMS,
        "dataset": "cityscapes",
        "backbone": "resnet101",
        "crop_size": 713,
        "output_stride": 8,
        "reported": {
            "split": "Cityscapes val",
            "miou_single_scale": 79.70,
            "miou_multi_scale": 80.91,
        },
    },
}


def describe(name: str) -> dict:
    """Everything the registry knows about ``name``: the entry plus classes and preprocessing.

    Args:
        name: str. A key of :data:`PRETRAINED`.

    Returns:
        A new dict with the entry's fields and ``class_names``, ``palette``,
        ``num_classes`` and ``preprocessing`` (mean, std in 0-255 units,
        channel order) of the weights.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained weights {name!r}; known: {', '.join(PRETRAINED)}")
    entry = copy.deepcopy(PRETRAINED[name])
    data = DATASETS[entry["dataset"]]
    entry.update(
        name=name,
        class_names=list(data["classes"]),
        palette=[list(c) for c in data["palette"]],
        num_classes=len(data["classes"]),
        preprocessing=resolve_preprocessing(
            SOURCES[entry["source"]]["preprocessing"], entry["backbone"]
        ),
    )
    return entry


def cache_dir() -> str:
    """Where downloads and converted models go (see the module docstring)."""
    if os.environ.get("PSPNET_TF_WEIGHTS_DIR"):
        return os.environ["PSPNET_TF_WEIGHTS_DIR"]
    checkout = os.path.join(os.path.dirname(__file__), "..", "..")
    if os.path.isfile(os.path.join(checkout, "weights", "README.md")) and os.path.isfile(
        os.path.join(checkout, "setup.cfg")
    ):
        return os.path.abspath(os.path.join(checkout, "weights"))
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(keras_home, "models", "pspnet_tf")


def fetch(name: str, cache: str | None = None) -> str:
    """Path of the converted ``.keras`` model of ``name``, converting it on first use.

    Args:
        name: str. A key of :data:`PRETRAINED`.
        cache: str or None. Cache folder; None means :func:`cache_dir`.

    Returns:
        str, the path of ``<cache>/<name>.keras``.

    Raises:
        FileNotFoundError: the source cannot be downloaded automatically and
            its file is not in ``<cache>/downloads`` (the message says where
            to get it and where to put it).
        ValueError: the checkpoint's sha256 differs from the published or the
            recorded one.
        ImportError: a PyTorch checkpoint and no torch installed.
    """
    entry = describe(name)
    cache = cache or cache_dir()
    target = os.path.join(cache, f"{name}.keras")
    if os.path.isfile(target):
        return target
    checkpoint, digest, verified = _checkpoint(entry, cache)
    model = convert_checkpoint(
        entry["source"], checkpoint, output_stride=entry["output_stride"], dataset=entry["dataset"]
    )
    provenance = {k: entry[k] for k in ("source", "url", "licence", "crop_size", "reported")}
    set_metadata(
        model,
        weights=name,
        weights_source={
            **get_metadata(model)["weights_source"],
            **provenance,
            "registry_name": name,
            "sha256": digest,
            "sha256_verified": verified,
        },
    )
    with atomic_path(target) as temporary:
        model.save(temporary)
    return target


def _checkpoint(entry, cache):
    """The checkpoint file: cached, downloaded, or (manual sources) placed by hand."""
    downloads = os.path.join(cache, "downloads")
    os.makedirs(downloads, exist_ok=True)  # get_file falls back to /tmp for a missing folder
    path = os.path.join(downloads, entry["filename"])
    if not os.path.isfile(path):
        if entry["download"] != "direct":
            raise FileNotFoundError(
                f"{entry['name']}: {entry['source']} publishes its models on a shared Google "
                f"Drive folder that cannot be downloaded automatically. Download "
                f"{entry['file_in_source']} from {entry['url']} and save it as {path} "
                f"(or convert it yourself: pspnet-tf convert --from {entry['source']} FILE "
                f"--output {entry['name']}.keras)"
            )
        path = _download(entry, cache)
    digest = _sha256(path)
    if entry["sha256"] is not None:
        if digest != entry["sha256"]:
            raise ValueError(
                f"{path}: sha256 {digest} does not match the published {entry['sha256']} "
                f"of {entry['name']}; refusing to convert it"
            )
        return path, digest, True
    _check_recorded(entry, path, digest, cache)
    return path, digest, False


def _download(entry, cache):
    import keras

    # Dropbox serves the file itself with dl=1 (the published links end in dl=0).
    url = entry["url"].replace("?dl=0", "?dl=1")
    try:
        return keras.utils.get_file(
            fname=entry["filename"],
            origin=url,
            file_hash=entry["sha256"],
            hash_algorithm="sha256",
            cache_dir=cache,
            cache_subdir="downloads",
        )
    except ValueError as err:  # get_file leaves a file that failed its hash check
        partial = os.path.join(cache, "downloads", entry["filename"])
        if os.path.exists(partial):
            os.remove(partial)
        raise ValueError(
            f"{entry['name']}: the download from {url} does not match the published sha256 "
            f"{entry['sha256']}; it was deleted and nothing was converted"
        ) from err


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_recorded(entry, path, digest, cache):
    """Trust on first use: record the first hash of an unverified file, refuse others."""
    record = os.path.join(cache, "sha256.json")
    known = {}
    if os.path.isfile(record):
        with open(record) as f:
            known = json.load(f)
    previous = known.get(entry["filename"])
    if previous is not None and previous != digest:
        raise ValueError(
            f"{path}: sha256 {digest} differs from {previous}, recorded in {record} when "
            f"{entry['name']} was first downloaded; refusing to convert it (delete the "
            "record if the source really changed the file)"
        )
    if previous is None:
        known[entry["filename"]] = digest
        write_text(record, json.dumps(known, indent=1, sort_keys=True))
