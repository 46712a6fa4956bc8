"""The example configuration shipped in config/ is valid as it stands (paths aside)."""

from __future__ import annotations

from pathlib import Path

from proto4d import config

EXAMPLES = Path(__file__).resolve().parents[1] / "config"


def test_proto4_example_is_valid_and_keeps_the_tunnel_keepalive(tmp_path):
    text = (EXAMPLES / "proto4.example.yaml").read_text()
    cfg = config.parse(text, "proto4.example.yaml", base_dir=tmp_path)
    assert cfg.app.uses_fd
    i = cfg.app.command.index("--timeout-keep-alive")
    assert int(cfg.app.command[i + 1]) > 90, "cloudflared keeps idle origin connections ~90 s"
    assert cfg.schedule.timezone == "Asia/Seoul" and cfg.schedule.weekly is not None
    assert cfg.app.shared == ("backend/.env", "backend/data")


def test_proto4_example_listens_on_loopback_only(tmp_path):
    cfg = config.parse((EXAMPLES / "proto4.example.yaml").read_text(), "proto4.example.yaml", base_dir=tmp_path)
    assert cfg.listen.host == "127.0.0.1", "cloudflared connects to localhost; 0.0.0.0 exposes the app on the LAN"
