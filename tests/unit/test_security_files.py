"""Security files (issue 24): the audit log rotates without losing or splitting a line when two
writers (two API workers) share it, and every file holding a secret is 0600."""

from __future__ import annotations

import json
import stat

from k2_resources.api.audit import AuditLog, params_digest
from k2_resources.platform.cluster_env import write_env_file


def test_two_audit_writers_rotate_one_file_and_keep_every_line(tmp_path):
    path = tmp_path / "audit.log"
    first, second = AuditLog(path, max_bytes=2048, backups=50), AuditLog(path, max_bytes=2048, backups=50)
    for index in range(200):
        (first if index % 2 else second).write({"n": index, "status": 200, "credential": "api_key"})
    files = [path, *sorted(tmp_path.glob("audit.log.*"))]
    assert len(files) > 3  # it rotated, several times
    numbers = []
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
        assert file.stat().st_size <= 2048, file
        numbers += [json.loads(line)["n"] for line in file.read_text().splitlines()]
    assert sorted(numbers) == list(range(200))  # none lost, none repeated, none torn
    first.close()
    second.close()


def test_the_parameters_digest_ignores_their_order_and_hides_their_values():
    assert params_digest(b"symbol=BHP&limit=5") == params_digest("limit=5&symbol=BHP")
    assert params_digest("symbol=BHP") != params_digest("symbol=CBA")
    assert "BHP" not in params_digest("symbol=BHP")


def test_the_cluster_env_file_with_the_generated_credentials_is_private(tmp_path):
    older = tmp_path / "cluster" / "env.sh"
    older.parent.mkdir(parents=True)
    older.write_text("# an older file, world-readable\n")
    older.chmod(0o644)
    path = write_env_file({"K2_S3_SECRET_ACCESS_KEY": "s3cr3t"}, home=tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "s3cr3t" in path.read_text()
