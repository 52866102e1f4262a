"""The watchdog's decisions with a fake clock and fake probe results
(lockd.leasewatch): deadline missed, EIO, conflict, recovery within and
beyond the server's lease time."""
import errno

from lockd.leasewatch import AT_RISK, CONFLICT, FENCED, HELD, LOST, OK, Decider

IO, IV, LEASE = 10.0, 2.5, 90.0


def decider(now=0.0):
    d = Decider(IO, IV, LEASE)
    d.add("a", "nfs", now)
    d.add("b", "nfs", now)
    d.add("c", "other", now)
    return d


def states(d):
    return {k: w.state for k, w in d.leases.items()}


def rounds(d, start, end, skip=()):
    """Healthy probes of every filesystem (but ``skip``) every IV seconds."""
    t = start
    while t <= end:
        for store in d.stores:
            if store not in skip:
                d.probe_started(store, t)
                d.probe_done(store, t, t + 0.01, None, [(k, OK) for k in d.on_store(store)])
        assert d.tick(t + 0.01) == []
        t += IV
    return t


def test_healthy_probes_keep_leases_held():
    d = decider()
    rounds(d, 0, 60)
    assert states(d) == {"a": HELD, "b": HELD, "c": HELD}


def test_a_probe_that_hangs_puts_the_leases_of_its_filesystem_at_risk_in_time():
    d = decider()
    t = rounds(d, 0, 20)
    d.probe_started("nfs", t)                 # the server stops answering
    d.probe_started("other", t)
    d.probe_done("other", t, t + 0.01, None, [("c", OK)])
    assert d.tick(t + IO - 0.1) == []
    out = d.tick(t + IO)
    assert {(x.lease, x.old, x.new) for x in out} == {("a", HELD, AT_RISK), ("b", HELD, AT_RISK)}
    assert "waited 10.0 s" in out[0].reason
    assert d.state("c") == HELD, "another filesystem is not affected"
    d.probe_done("other", t + 5, t + 5.01, None, [("c", OK)])
    assert d.tick(t + IO + 5) == [], "a decision is made once"


def test_no_probe_at_all_is_a_missed_deadline_too():
    d = decider()
    d.remove("c")
    rounds(d, 0, 5)                           # last success at t=5
    assert d.tick(5 + IO + IV - 0.1) == []
    out = d.tick(5 + IO + IV)
    assert {x.lease for x in out} == {"a", "b"} and "no probe answered" in out[0].reason


def test_a_stalled_storage_call_counts():
    d = decider()
    out = d.tick(1.0, stalled={"nfs": 10.5})
    assert {x.lease for x in out} == {"a", "b"} and "storage call" in out[0].reason


def test_recovery_within_the_lease_time_is_held_again():
    d = decider()
    rounds(d, 0, 10)                          # last success started at t=10
    d.probe_started("nfs", 12.5)
    d.tick(12.5 + IO)                         # at risk
    out = d.probe_done("nfs", 12.5, 60.0, None, [("a", OK), ("b", OK)])
    assert {(x.lease, x.new) for x in out} == {("a", HELD), ("b", HELD)}
    assert "still ours" in out[0].reason


def test_recovery_after_the_lease_time_is_lost_for_good():
    d = decider()
    rounds(d, 0, 10)
    d.probe_started("nfs", 12.5)
    d.tick(30)
    out = d.probe_done("nfs", 12.5, 10 + LEASE + 1, None, [("a", OK), ("b", OK)])
    assert {(x.lease, x.new) for x in out} == {("a", LOST), ("b", LOST)}
    assert "longer than its lease time" in out[0].reason
    rounds(d, 200, 230)
    assert states(d)["a"] == LOST, "lost never goes back"


def test_eio_loses_every_lease_on_the_filesystem():
    d = decider()
    out = d.probe_done("nfs", 1.0, 1.1, errno.EIO, [])
    assert {(x.lease, x.new) for x in out} == {("a", LOST), ("b", LOST)} and "EIO" in out[0].reason
    assert d.state("c") == HELD


def test_a_conflict_loses_that_lease_only():
    d = decider()
    out = d.probe_done("nfs", 1.0, 1.1, None, [("a", CONFLICT), ("b", OK)])
    assert [(x.lease, x.new) for x in out] == [("a", LOST)] and "another holder" in out[0].reason
    out = d.probe_done("nfs", 2.0, 2.1, None, [("b", errno.EIO)])
    assert [(x.lease, x.new) for x in out] == [("b", LOST)]


def test_other_errors_are_no_news_and_the_deadline_decides():
    d = decider()
    d.remove("c")
    assert d.probe_done("nfs", 1.0, 1.1, errno.EINTR, []) == []
    assert states(d)["a"] == HELD
    assert {x.lease for x in d.tick(0.0 + IO + IV)} == {"a", "b"}


def test_fenced_moves_only_to_lost():
    d = decider()
    d.tick(IO + IV)
    d.mark("a", FENCED, "owner stopped", 13.0)
    out = d.probe_done("nfs", 14.0, 14.1, None, [("a", OK), ("b", OK)])
    assert [(x.lease, x.new) for x in out] == [("b", HELD)], "a fenced lease is not silently held again"
    out = d.probe_done("nfs", 15.0, 15.1, None, [("a", CONFLICT)])
    assert [(x.lease, x.new) for x in out] == [("a", LOST)]


def test_removing_the_last_lease_forgets_the_filesystem():
    d = decider()
    d.remove("c")
    assert "other" not in d.stores and d.state("c") == HELD
    d.remove("a")
    assert "nfs" in d.stores


def test_the_measured_nfs_partition_sequence_ends_lost_and_stays_lost():
    """As measured on real NFS (hard mount): calls block while cut off, and
    about 4 s after the reconnect the hung probe returns EIO and F_OFD_GETLK
    shows a conflict. The fenced lease must end lost, never held again."""
    d = decider()
    d.remove("c")
    rounds(d, 0, 10)                          # last success started at t=10
    d.probe_started("nfs", 12.5)              # the cut: this probe blocks
    out = d.tick(12.5 + IO)
    assert {(x.lease, x.new) for x in out} == {("a", AT_RISK), ("b", AT_RISK)}
    d.mark("a", FENCED, "owner killed", 12.5 + IO)
    out = d.probe_done("nfs", 12.5, 12.5 + 40, errno.EIO, [])   # reconnect + 4 s
    assert {(x.lease, x.new) for x in out} == {("a", LOST), ("b", LOST)}
    for t in (60.0, 62.5, 65.0):
        d.probe_started("nfs", t)
        assert d.probe_done("nfs", t, t + 0.01, None, [("a", CONFLICT), ("b", CONFLICT)]) == []
    assert states(d) == {"a": LOST, "b": LOST}
