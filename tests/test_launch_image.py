"""sagemaker/Dockerfile installs exactly setup.cfg's pins (the image cannot be built here)."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_cfg_requirements() -> set[str]:
    """install_requires (torch excepted: the AWS image's own build) + the gpu, hf and wandb extras."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].split("\n")
    for extra in ("gpu", "hf", "wandb"):
        lines += cfg["options.extras_require"][extra].split("\n")
    reqs = {line.strip() for line in lines if line.strip() and not line.strip().startswith("#")}
    return {r for r in reqs if not re.match(r"^torch\b", r)}


def dockerfile_requirements() -> list[str]:
    text = (REPO / "sagemaker" / "Dockerfile").read_text()
    block = text.split("# pins:begin")[1].split("# pins:end")[0]
    return re.findall(r'"([^"]+)"', block)


def test_dockerfile_installs_exactly_the_pins_of_setup_cfg():
    installed = dockerfile_requirements()
    assert len(installed) == len(set(installed)), "a requirement is installed twice"
    assert set(installed) == setup_cfg_requirements()


def test_dockerfile_base_is_the_aws_pytorch_training_image_and_installs_the_package():
    text = (REPO / "sagemaker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.match(r"^763104351884\.dkr\.ecr\.\$\{REGION\}\.amazonaws\.com/pytorch-training:"
                    r"2\.\d+\.\d+-gpu-py3\d+-cu12\d-ubuntu\d+\.\d+-sagemaker$", base)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "pip install --no-deps /opt/alfred-train" in text
    for part in ("alfred_train", "parallel", "kernels", "sagemaker", "configs"):
        assert re.search(rf"^COPY {part} /opt/alfred-train/{part}$", text, re.M), part
