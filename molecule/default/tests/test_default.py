def test_systemd_runs(host):
    assert host.run("systemctl is-system-running").stdout.strip() in ("running", "degraded")
