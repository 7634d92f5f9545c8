"""The HAProxy wrapper's confine(), on the config Ray itself renders: side doors on loopback, the service as given."""

import pytest


@pytest.mark.parametrize("host,frontend", [("0.0.0.0", "bind *:8000"), ("127.0.0.1", "bind 127.0.0.1:8000")])
def test_confine_moves_the_side_doors_to_loopback_and_keeps_the_frontend_as_given(tmp_path, host, frontend):
    from ray.serve._private.haproxy import HAProxyApi, HAProxyConfig
    from ray.serve.config import HTTPOptions

    from aigc_ray.ingress import confine

    cfg = HAProxyConfig(http_options=HTTPOptions(host=host, port=8000), socket_path=str(tmp_path / "admin.sock"),
                        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
                        stats_port=8404, metrics_port=9101)
    HAProxyApi(cfg, config_file_path=str(tmp_path / "haproxy.cfg"))._generate_config_file_internal()
    text = (tmp_path / "haproxy.cfg").read_text()  # Ray 2.60's own template, rendered
    binds = [line.strip() for line in confine(text).splitlines() if line.strip().startswith("bind ")]
    assert sorted(binds) == sorted([frontend, "bind 127.0.0.1:9101", "bind 127.0.0.1:8404"]), binds
    assert "mode 666" not in confine(text) and confine(confine(text)) == confine(text)


def test_a_state_folder_another_user_made_first_is_refused_in_one_line(tmp_path, monkeypatch):
    import os
    import tempfile

    from aigc_ray import ingress
    from aigc_ray.config import ConfigError

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = ingress.state_dir(18000)
    assert oct(os.stat(d).st_mode & 0o777) == "0o700"
    env = ingress.haproxy_env(18000)
    assert all(env[k].startswith(str(d)) for k in env if k.endswith(("_PATH", "_LOC", "_BASE", "_FILE"))
               and k != "RAY_SERVE_HAPROXY_BINARY_PATH")  # every socket and file in the private folder
    theirs = tmp_path / f"aigc-ray-serve-{os.getuid()}-18001"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)  # made by `nobody` before us
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        ingress.state_dir(18001)
    (tmp_path / f"aigc-ray-serve-{os.getuid()}-18002").symlink_to(tmp_path)  # or a link to a folder of theirs
    with pytest.raises(ConfigError, match="not a folder"):
        ingress.state_dir(18002)
