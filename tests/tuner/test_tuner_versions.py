"""Fine-tuning an RWKV version the tuner does not support yet."""

import json
from pathlib import Path

from rwkv_mlx import lora as lora_cli

RWKV6_PTH = Path(__file__).resolve().parents[1] / "fixtures" / "rwkv6" / "rwkv6.pth"


def test_older_version_rejected_clearly(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps({"text": "abc abc abc"}) + "\n")

    status = lora_cli.main(
        ["--model", str(RWKV6_PTH), "--data", str(data), "--train", "--iters", "1", "--adapter-path", str(tmp_path / "a")]
    )
    err = capsys.readouterr().err

    assert status == 1
    assert "RWKV6 model" in err
    assert "RWKV-7 models only" in err
    assert not (tmp_path / "a" / "adapters.safetensors").exists()
