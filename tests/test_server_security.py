"""Path confinement ('..' and symlink escapes), argument size limits, HTTP token handling."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from mcp_conftest import anyio_backend, client, fake_expert, make_server  # noqa: F401

from es_merging.errors import InvalidInputError, PathNotAllowedError
from server.security import check_id, check_sizes, resolve_allowed


def test_dotdot_and_symlink_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("x")
    (root / "sub" / "ok.txt").write_text("ok")
    os.symlink(outside, root / "link")
    os.symlink(outside / "key.txt", root / "sub" / "filelink")
    os.symlink(root / "sub" / "ok.txt", root / "inner_link")

    assert resolve_allowed(root / "sub" / "ok.txt", [root]) == (root / "sub" / "ok.txt").resolve()
    assert resolve_allowed(root / "inner_link", [root]).name == "ok.txt"  # a symlink that stays inside
    for bad in (root / ".." / "secret" / "key.txt", f"{root}/sub/../../secret", root / "link" / "key.txt",
                root / "sub" / "filelink", root / "link", "/etc/passwd", "~/../../etc"):
        with pytest.raises(PathNotAllowedError):
            resolve_allowed(bad, [root])
    # a not-yet-existing output path is judged by where it would resolve
    assert resolve_allowed(root / "new" / "dir", [root]) == (root / "new" / "dir").resolve()
    with pytest.raises(PathNotAllowedError):
        resolve_allowed(root / "link" / "new", [root])
    with pytest.raises(PathNotAllowedError):
        resolve_allowed("", [root])
    with pytest.raises(PathNotAllowedError):
        resolve_allowed("a\x00b", [root])
    with pytest.raises(PathNotAllowedError):
        resolve_allowed(root / "sub" / "missing.txt", [root], must_exist=True)


def test_size_and_id_checks():
    check_sizes({"a": ["x"] * 3, "b": {"c": "y" * 10}}, max_list=3, max_string=10)
    with pytest.raises(InvalidInputError, match="4 items"):
        check_sizes({"a": ["x"] * 4}, max_list=3, max_string=10)
    with pytest.raises(InvalidInputError, match=r"b\.c is 11 characters"):
        check_sizes({"b": {"c": "y" * 11}}, max_list=3, max_string=10)
    with pytest.raises(InvalidInputError, match=r"a\[0\]\[1\]"):
        check_sizes({"a": [["ok", "z" * 11]]}, max_list=3, max_string=10)
    assert check_id("zoo-molecule_v1.2") == "zoo-molecule_v1.2"
    for bad in ("", "../x", "a/b", "-lead", "x" * 65, "sp ace"):
        with pytest.raises(InvalidInputError):
            check_id(bad)


@pytest.mark.anyio
async def test_tools_refuse_escaping_paths(make_server, tmp_path):
    inputs = tmp_path / "inputs"
    secret = fake_expert(tmp_path / "secret", "leak", "molecule")
    os.symlink(secret, inputs / "innocent")
    (inputs / "table.csv").symlink_to(tmp_path / "secret" / "leak" / "expert.json")
    async with client(make_server()) as c:
        r = await c.call_tool("register_expert", {"paths": [str(inputs / "innocent"), f"{inputs}/../secret/leak"]})
        errors = [x["error"] for x in r.structured_content["results"]]
        assert all(e and "outside the allowed roots" in e for e in errors), errors
        r = await c.call_tool("build_probe", {"table_path": str(inputs / "table.csv")})
        assert r.is_error and "outside the allowed roots" in r.content[0].text
        r = await c.call_tool("inspect_cell_profiles", {"h5ad_path": f"{inputs}/../secret/x.h5ad"})
        assert r.is_error and "outside the allowed roots" in r.content[0].text
        r = await c.call_tool("start_merge", {"experts": ["a", "b"], "method": "average",
                                              "out": str(inputs / "innocent" / "model")})
        assert r.is_error


def test_http_requires_a_token(tmp_path):
    from server.app import create_server
    from server.http import HttpConfigError, build_http_app
    from server.settings import Settings

    settings = Settings(data_home=tmp_path / "home", bootstrap=False, transport="http", token=None)
    with pytest.raises(HttpConfigError, match="ES_MERGING_TOKEN"):
        build_http_app(create_server(settings), settings)
    weak = settings.model_copy(update={"token": "short"})
    with pytest.raises(HttpConfigError, match="too short"):
        build_http_app(create_server(weak), weak)


def test_settings_from_env_and_flags(tmp_path, monkeypatch):
    from server.settings import Settings

    env = {"ES_MERGING_DATA_HOME": str(tmp_path / "h"), "ES_MERGING_ALLOW_ROOTS": f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}",
           "ES_MERGING_MAX_LIST": "7", "ES_MERGING_BOOTSTRAP": "0", "ES_MERGING_TOKEN": "t" * 20,
           "ES_MERGING_DATA_DIR": str(tmp_path / "data")}
    s = Settings.from_env(env, extra_roots=[str(tmp_path / "c")], port=9999, max_list=None)
    assert s.data_home == tmp_path / "h" and s.max_list == 7 and s.bootstrap is False and s.port == 9999
    assert s.token == "t" * 20 and "t" * 20 not in repr(s)
    assert [tmp_path / n for n in "abc"] == list(s.extra_roots)
    assert tmp_path / "data" in s.allowed_roots and tmp_path / "data" not in s.output_roots
    assert Path.cwd() in s.allowed_roots
    with pytest.raises(ValueError, match="ES_MERGING_PORT"):
        Settings.from_env({"ES_MERGING_PORT": "eighty"})
