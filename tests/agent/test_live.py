"""The live model: base + active deltas composed exactly, the weights hash, the snapshot file."""
import torch

from knowledger.agent.editing import open_model
from knowledger.agent.live import (ActiveDelta, LiveModel, read_snapshot, remove_stale_temporaries,
                                   state_hash, stored_delta)
from knowledger.editors.apply import weight_sha256
from knowledger.editors.result import LayerDelta


def live_model(tiny_dir):
    lm = open_model(str(tiny_dir))
    return LiveModel(lm, base_model_id=1, base_sha256=lm.weights_sha256)


def random_delta(live, layer, seed, rank=2):
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = live.lm.spec.mlp_dims(live.model, layer)
    return stored_delta(LayerDelta(layer, live.lm.spec.weight_name(layer),
                                   torch.randn(d_out, rank, generator=g) * 0.05,
                                   torch.randn(d_in, rank, generator=g) * 0.05))


def params(live):
    return {n: live.model.get_parameter(n).detach().clone() for n in
            (live.lm.spec.weight_name(1), live.lm.spec.weight_name(2))}


def test_state_hash_covers_base_and_touched_parameters_in_any_order():
    h = state_hash("b" * 64, {"x": "1", "y": "2"})
    assert h == state_hash("b" * 64, {"y": "2", "x": "1"})
    assert h != state_hash("c" * 64, {"x": "1", "y": "2"}) != state_hash("b" * 64, {"x": "1"})
    assert state_hash("b" * 64, {}) != "b" * 64  # the base alone has its own tagged hash


def test_removing_the_last_operation_restores_earlier_weights_bit_for_bit(tiny_dir):
    live = live_model(tiny_dir)
    base, h0 = params(live), live.state_hash
    a = [ActiveDelta(1, 1, random_delta(live, 1, 0)), ActiveDelta(1, 1, random_delta(live, 2, 1))]
    b = [ActiveDelta(2, 2, random_delta(live, 2, 2))]
    h_a = live.set_active(a)
    after_a = params(live)
    assert not torch.equal(after_a[live.lm.spec.weight_name(1)], base[live.lm.spec.weight_name(1)])
    h_ab = live.set_active(a + b)
    assert h_ab not in (h_a, h0)
    assert live.set_active(a) == h_a
    assert all(torch.equal(params(live)[n], after_a[n]) for n in base)
    assert live.set_active([]) == h0 and live.param_shas == {}
    assert all(torch.equal(params(live)[n], base[n]) for n in base)
    # a pure function of the active set: another process (a fresh model) gets the same bits
    fresh = live_model(tiny_dir)
    assert fresh.hash_of(b + a) == h_ab  # order given does not matter, seq order is used
    assert fresh.set_active(a + b) == h_ab
    assert fresh.param_shas == {n: weight_sha256(t) for n, t in params(fresh).items()}


def test_at_base_puts_the_base_weights_in_place_for_the_duration(tiny_dir):
    live = live_model(tiny_dir)
    base = params(live)
    live.set_active([ActiveDelta(1, 1, random_delta(live, 1, 0))])
    edited = params(live)
    with live.at_base():
        assert all(torch.equal(params(live)[n], base[n]) for n in base)
    assert all(torch.equal(params(live)[n], edited[n]) for n in base)


def test_snapshot_round_trip_and_every_reason_not_to_trust_one(tiny_dir, tmp_path):
    live = live_model(tiny_dir)
    active = [ActiveDelta(1, 1, random_delta(live, 1, 0))]
    h = live.set_active(active)
    path = tmp_path / "ledger.live.safetensors"
    names = {live.lm.spec.weight_name(1)}
    check = lambda **kw: read_snapshot(path, **{**dict(base_sha256=live.base_sha256,  # noqa: E731
                                                       expected_state=h, params=names), **kw})
    assert check() == (None, "ledger.live.safetensors is missing")
    live.write_snapshot(path, head_seq=1)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    tensors, why = check()
    assert why == "" and torch.equal(tensors[live.lm.spec.weight_name(1)], params(live)[live.lm.spec.weight_name(1)])
    assert check(expected_state="0" * 64)[1].startswith("ledger.live.safetensors is stale (state ")
    assert check(base_sha256="0" * 64)[1] == "ledger.live.safetensors belongs to another base model"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the tensor bytes
    path.write_bytes(bytes(data))
    assert check() == (None, "ledger.live.safetensors is corrupt (its tensors do not hash to its recorded state)")
    path.write_bytes(bytes(data[:40]))  # truncated
    assert check()[1].startswith("ledger.live.safetensors is corrupt (")


def test_half_written_temporaries_are_removed(tmp_path):
    path = tmp_path / "ledger.live.safetensors"
    (tmp_path / ".ledger.live.safetensors.123.tmp").write_bytes(b"half")
    (tmp_path / "other.tmp").write_bytes(b"keep")
    assert remove_stale_temporaries(path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["other.tmp"]
