"""`rayft compress`: adapters of one base in one shared subspace, as vlora does. The same number of
components gives the same reconstruction error as vlora-dev's own `SharedSubspace` on the same
adapters; more components, less error; all of them, exact; decompressed adapters load in PEFT;
a new adapter can be projected or absorbed."""

import random

import pytest
import torch
from test_merge import make_adapter, peft_deltas

from rayft.adapters.compress import absorb, compress, decompress, load_subspace, reconstruction_errors, save_subspace
from rayft.adapters.merge import MergeError, read_lora
from rayft.cli import main

vlora = pytest.importorskip("vlora")


@pytest.fixture(scope="module")
def same_rank(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("compress")
    rng = random.Random(11)
    paths = [make_adapter(tiny_model_dir, root / f"t{k}", rng, r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                          rank_pattern={}, alpha_pattern={}) for k in range(6)]
    return paths


def vlora_errors(paths, k):
    from vlora import SharedSubspace
    from vlora.io import LoRAWeights

    weights = []
    for p in paths:
        lora = read_lora(p)
        names = sorted(lora.layers)
        weights.append(LoRAWeights(layer_names=names, lora_a={n: lora.layers[n][0] for n in names},
                                   lora_b={n: lora.layers[n][1] for n in names}, rank=4))
    space = SharedSubspace.from_adapters(weights, task_ids=[f"t{i}" for i in range(len(paths))], num_components=k)
    out = []
    for i, w in enumerate(weights):
        r = space.reconstruct(f"t{i}")
        num = sum(float((r.lora_a[n] - w.lora_a[n]).pow(2).sum() + (r.lora_b[n] - w.lora_b[n]).pow(2).sum())
                  for n in w.layer_names)
        den = sum(float(w.lora_a[n].pow(2).sum() + w.lora_b[n].pow(2).sum()) for n in w.layer_names)
        out.append((num / den) ** 0.5)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_the_same_components_give_vlora_s_reconstruction_error(k, same_rank):
    adapters = {p.name: read_lora(p) for p in same_rank}
    space = compress(adapters, components=k)
    ours = reconstruction_errors(space, adapters)
    assert list(ours.values()) == pytest.approx(vlora_errors(same_rank, k), rel=1e-4, abs=1e-6)
    if k == 5:  # six adapters centred span five directions: exact
        assert max(ours.values()) < 1e-5
    assert space.stored_numbers() < space.original_numbers() or k == 5


def test_errors_fall_with_components_and_variance_picks_the_fewest(same_rank):
    adapters = {p.name: read_lora(p) for p in same_rank}
    means = [sum(reconstruction_errors(compress(adapters, components=k), adapters).values()) for k in (1, 2, 3, 4)]
    assert means == sorted(means, reverse=True) and means[0] > means[-1]
    loose, tight = compress(adapters, variance=0.3), compress(adapters, variance=0.95)
    assert max(c.shape[0] for c in loose.components.values()) < max(c.shape[0] for c in tight.components.values())
    assert sum(reconstruction_errors(tight, adapters).values()) < sum(reconstruction_errors(loose, adapters).values())


def test_decompressed_adapters_load_in_peft_and_a_new_one_projects_or_is_absorbed(same_rank, tiny_model_dir, tmp_path,
                                                                               capsys):
    five, new = same_rank[:5], same_rank[5]
    assert main(["compress", *map(str, five), "--components", "4", "--output", str(tmp_path / "space")]) == 0
    assert "5 adapter(s) in one subspace" in capsys.readouterr().out
    space = load_subspace(tmp_path / "space")
    assert main(["decompress", str(tmp_path / "space"), "--output", str(tmp_path / "back")]) == 0
    for p in five:  # 5 adapters, 4 centred directions: every one comes back whole
        got, want = peft_deltas(tiny_model_dir, tmp_path / "back" / p.name), peft_deltas(tiny_model_dir, p)
        for layer in want:
            torch.testing.assert_close(got[layer], want[layer], atol=1e-5, rtol=1e-4)
    adapter = read_lora(new)
    space.project("new", adapter)
    projected = reconstruction_errors(space, {"new": adapter})["new"]
    grown = absorb(space, "new", adapter, components=5)
    absorbed = reconstruction_errors(grown, {"new": adapter})["new"]
    assert absorbed < 1e-5 < projected, "absorbing widens the basis to hold the new adapter"
    assert sorted(grown.loadings) == sorted([p.name for p in five] + ["new"])
    save_subspace(grown, tmp_path / "grown")
    assert decompress(load_subspace(tmp_path / "grown"), tmp_path / "g").keys() == grown.loadings.keys()


def test_adapters_of_other_ranks_or_layers_are_refused_by_name(same_rank, tiny_model_dir, tmp_path):
    other = make_adapter(tiny_model_dir, tmp_path / "r8", random.Random(2), r=8,
                         target_modules=["q_proj", "v_proj", "up_proj"], rank_pattern={}, alpha_pattern={})
    adapters = {p.name: read_lora(p) for p in same_rank[:2]}
    with pytest.raises(MergeError, match="adapters of one rank only"):
        compress({**adapters, "r8": read_lora(other)}, components=1)
    with pytest.raises(MergeError, match="one of them"):
        compress(adapters)
    with pytest.raises(MergeError, match="not found"):
        load_subspace(tmp_path / "nowhere")
