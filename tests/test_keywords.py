"""Flags reach the losses and merge rules by name (**vars(args)): a keyword that no flag of its
family sets, or a family flag that no function reads, stops train.py at start-up in one line
(train.check_keywords) instead of silently keeping a default."""

import pytest

import loss
import train
import cluster


def test_the_shipped_losses_and_rules_read_their_flags():
    train.get_args([])                                     # no error: every keyword is a flag of its family


@pytest.mark.parametrize("registry, name, make, needle", [
    # a loss reading `sharpness` while its flag is --sharpen: it would keep sharpness=2.0 for ever
    (loss.CLUSTER_LOSSES, "sharp", lambda: (lambda q, k, a, sharpness=2.0, **_: q.sum()),
     "takes 'sharpness', which is not one of its flags (--neg-t, --num-neg)"),
    # a loss declaring its own tau=0.5 would silently get eq. 10's --tau 0.1
    (loss.INSTANCE_LOSSES, "own-tau", lambda: (lambda q1, q2, k1, k2, tau=0.5, **_: q1.sum()),
     "takes 'tau', which is not one of its flags (--infonce-t)"),
    (cluster.MERGE_RULES, "mine", lambda: (lambda mixture, lam=1.0, **_: None),
     "(--merge-rule mine) takes 'lam', which is not one of its flags (--merge-lambda)"),
])
def test_a_keyword_that_is_no_flag_of_its_family_stops_the_run(monkeypatch, capsys, registry, name, make, needle):
    monkeypatch.setitem(registry, name, make())
    with pytest.raises(SystemExit) as e:
        train.get_args([])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err


def test_a_flag_no_function_reads_stops_the_run(monkeypatch, capsys):
    """--infonce-t's loss renamed its keyword: the flag now does nothing."""
    monkeypatch.setitem(loss.INSTANCE_LOSSES, "infonce", lambda q1, q2, k1, k2, infonce_temp=1.0, **_: q1.sum())
    with pytest.raises(SystemExit):
        train.get_args([])
    err = capsys.readouterr().err
    assert "takes 'infonce_temp'" in err                   # the first of the two problems found
    monkeypatch.setitem(loss.INSTANCE_LOSSES, "infonce", lambda q1, q2, k1, k2, **_: q1.sum())
    with pytest.raises(SystemExit):
        train.get_args([])
    assert "--infonce-t is a flag of --instance-loss, but no function of it (byol, infonce, none) takes 'infonce_t'" \
        in capsys.readouterr().err
