"""Ray's token for local clusters (router/ray_auth.py): made or tightened to its owner only, never in the env."""

from __future__ import annotations

import stat

from router import ray_auth


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_token_file_is_its_owners_only(tmp_path) -> None:
    path = tmp_path / "ray" / "auth_token"
    assert ray_auth.ensure_private_token({ray_auth.TOKEN_PATH_ENV: str(path)}) == path
    assert _mode(path) == 0o600
    assert len(path.read_text().strip()) >= 32
    assert ray_auth.read_token({ray_auth.TOKEN_PATH_ENV: str(path)}) == path.read_text().strip()


def test_an_existing_token_file_is_kept_and_tightened(tmp_path) -> None:
    path = tmp_path / "auth_token"
    path.write_text("an-existing-token-of-this-user")
    path.chmod(0o644)
    ray_auth.ensure_private_token({ray_auth.TOKEN_PATH_ENV: str(path)})
    assert _mode(path) == 0o600
    assert path.read_text() == "an-existing-token-of-this-user"


def test_a_token_in_the_environment_writes_no_file(tmp_path) -> None:
    environ = {ray_auth.TOKEN_ENV: "from-the-env", ray_auth.TOKEN_PATH_ENV: str(tmp_path / "auth_token")}
    assert ray_auth.ensure_private_token(environ) is None
    assert not (tmp_path / "auth_token").exists()
    assert ray_auth.read_token(environ) == "from-the-env"


def test_local_clusters_run_in_token_mode() -> None:
    from router.launch import ray_process_env

    env = ray_process_env("0.0.0.0")
    assert env[ray_auth.AUTH_MODE_ENV] == "token"
    assert env["RAYROUTE_HAPROXY_PAGES_HOST"] == "127.0.0.1"  # the pages stay off the network with the API on it
