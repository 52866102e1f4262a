"""virtlockd.conf parsing: libvirt's virConf syntax, defaults, clear errors."""
import pytest

from lockd import config


def test_defaults_when_missing_default_file(tmp_path):
    assert config.load(str(tmp_path / "absent.conf"), required=False) == config.DEFAULTS


def test_missing_explicit_file_is_fatal(tmp_path):
    with pytest.raises(config.ConfigError, match="No such file or directory"):
        config.load(str(tmp_path / "absent.conf"), required=True)


def test_libvirt_sample_syntax(tmp_path):
    f = tmp_path / "virtlockd.conf"
    f.write_text('# comment\nlog_level = 1\nlog_filters="1:locking 4:object"\n'
                 "log_outputs = '3:syslog:virtlockd'  # trailing comment\n"
                 "max_clients = 2048\nadmin_max_clients = 5\nlog_buffer_size = 64\n"
                 'unknown_future_key = [ "a",\n  "b", ]\n')
    cfg = config.load(str(f), required=True)
    assert cfg["log_level"] == 1 and cfg["max_clients"] == 2048 and cfg["admin_max_clients"] == 5
    assert cfg["log_filters"] == "1:locking 4:object" and cfg["log_outputs"] == "3:syslog:virtlockd"
    assert "unknown_future_key" not in cfg


@pytest.mark.parametrize("text,line,what", [
    ("log_level = 1\nmax_clients == 3\n", 2, "expecting a value"),
    ("log_level 1\n", 1, "expecting '='"),
    ('\n\nlog_outputs = "unterminated\n', 3, "unexpected character"),
    ("max_clients = 1 2\n", 1, "expecting end of line"),
    ("= 3\n", 1, "expecting a setting name"),
])
def test_syntax_errors_name_file_and_line(tmp_path, text, line, what):
    f = tmp_path / "bad.conf"
    f.write_text(text)
    with pytest.raises(config.ConfigError) as ei:
        config.load(str(f), required=True)
    assert "%s:%d:" % (f, line) in str(ei.value) and what in str(ei.value)


@pytest.mark.parametrize("text,what", [
    ('max_clients = "many"\n', "max_clients must be a non-negative integer"),
    ("log_outputs = 3\n", "log_outputs must be a quoted string"),
    ('lock_type = "flock"\n', 'lock_type must be "ofd" or "posix"'),
    ("max_clients = 0\n", "max_clients must be at least 1"),
])
def test_type_errors(tmp_path, text, what):
    f = tmp_path / "bad.conf"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=what):
        config.load(str(f), required=True)
