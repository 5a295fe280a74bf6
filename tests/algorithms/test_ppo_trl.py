"""PPO against trl 1.12's own ``PPOTrainer.train`` (tests/trl_ppo_oracle.py, run in a subprocess
with trl 1.12.0 from .oracle/trl-1.12; `./run setup` installs it).

One rollout of 8 fixed responses (an EOS in the middle followed by padding or by more tokens, at
the first and at the last position, and none) on tiny random models, two PPO epochs, for pad ≠ EOS
and pad = EOS, k1 and k3 settings. Checked:

- with trl's placement (algorithms/ppo.py's `score_mask`, `value_mask`), macft's functions give
  trl's rewards, GAE advantages and returns, whitened advantages, the policy / value losses and
  clip fractions of every micro-batch, and the logged objective/* and loss/* metrics, to 1e-6;
- with macft's own placement, through the trainer's rollout code (PPOLogic.make_rollout fed trl's
  responses, log-probs, values and scores): its completions and masks against trl's
  post-processing, and exactly where and by how much its rewards and advantages differ from
  trl's (the off-by-one explained in algorithms/ppo.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from algorithms import ppo

REPO = Path(__file__).resolve().parents[2]
ORACLE = Path(os.environ.get("MACFT_TRL_PPO_ORACLE", REPO / ".oracle" / "trl-1.12"))
INSTALL = f'python -m pip install --no-deps --target {ORACLE} "trl==1.12.0"   (or ./run setup)'
TOL = 1e-6

QUERIES = [[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16], [17, 18, 19], [20, 21, 22], [6, 8, 10], [7, 9, 11]]
EOS = 1
# None is the pad token, filled in per case; EOS mid-row, none, at the last position, first, with
# tokens (another EOS among them) after it as a sampler that does not stop would leave them.
RESPONSES = [[4, 5, EOS, None, None, None], [4, 5, 6, 7, 8, 9], [4, 5, 6, 7, 8, EOS],
             [EOS, None, None, None, None, None],
             [9, EOS, 3, EOS, 7, 2], [3, 4, 5, 6, EOS, None], [2, EOS, None, None, None, None],
             [7, 7, 7, EOS, None, None]]
SETTINGS = {
    "k1-trl-defaults": dict(kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.05,
                            vf_coef=0.1, missing_eos_penalty=1.0),
    "k3-discounted-whitened": dict(kl_coef=0.2, kl_estimator="k3", gamma=0.9, lam=0.8, cliprange=0.1,
                                   cliprange_value=0.02, vf_coef=0.5, whiten_rewards=True),
}
CASES = [(pad, name) for pad in ("pad-distinct", "pad-is-eos") for name in SETTINGS]


@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory):
    """{(pad, settings name): (arrays, metadata)} from one trl 1.12 subprocess."""
    if not (ORACLE / "trl" / "experimental" / "ppo" / "ppo_trainer.py").is_file():
        message = f"trl 1.12.0, the PPO oracle, is not installed in {ORACLE}: {INSTALL}"
        if os.environ.get("MACFT_REQUIRE_ORACLES"):
            pytest.fail(message)  # ./run test: the oracle is part of the setup
        pytest.skip(message)
    out = tmp_path_factory.mktemp("trl_ppo")
    spec = []
    for pad, name in CASES:
        pad_id = EOS if pad == "pad-is-eos" else 0
        spec.append({"pad_is_eos": pad == "pad-is-eos", "seed": 3 + len(spec), "queries": QUERIES,
                     "responses": [[pad_id if t is None else t for t in row] for row in RESPONSES],
                     "settings": {**SETTINGS[name], "num_ppo_epochs": 2}})
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(ORACLE), "TRL_EXPERIMENTAL_SILENCE": "1"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "trl_ppo_oracle.py"), str(out / "spec.json"),
                             str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=out)
    assert result.returncode == 0, f"the trl 1.12 oracle failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    runs = {}
    for index, case in enumerate(CASES):
        arrays = dict(np.load(out / f"case{index}.npz"))
        runs[case] = (arrays, json.loads((out / f"case{index}.json").read_text()))
    return runs


def _close(actual, expected, what):
    actual, expected = _numpy(actual), np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=TOL, atol=TOL, err_msg=what)
    return float(np.max(np.abs(actual - expected), initial=0.0))


def _numpy(x):
    if type(x).__module__.startswith("mlx"):
        import mlx.core as mx

        return np.array(x.astype(mx.float64)) if x.dtype != mx.bool_ else np.array(x)
    if type(x).__module__.startswith("torch"):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _index(name, rows):
    if name == "torch":
        import torch

        return torch.from_numpy(rows.astype(np.int64))
    import mlx.core as mx

    return mx.array(rows.astype(np.int32))


def _array(name, dtype):
    if name == "torch":
        import torch

        return lambda v: torch.from_numpy(np.asarray(v, dtype=dtype).copy())
    import mlx.core as mx

    return lambda v: mx.array(np.asarray(v, dtype=dtype), dtype=getattr(mx, dtype))


@pytest.mark.parametrize("array_backend", [("torch", "float64"), ("torch", "float32"), ("mlx", "float32")],
                         ids=lambda b: "-".join(b))
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_trl_placement_gives_trl_numbers(trl_runs, case, array_backend):
    """macft's functions with trl's masks and score position reproduce everything trl computed."""
    arrays, meta = trl_runs[case]
    settings = SETTINGS[case[1]]
    a = _array(*array_backend)
    r = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("rollout/")}
    policy_mask, value_mask = ~r["padding_mask"], ~r["padding_mask_p1"]
    score_mask = np.zeros(policy_mask.shape)
    score_mask[np.arange(len(score_mask)), r["actual_end"]] = 1.0
    diffs = {}

    rewards, metrics = ppo.kl_penalized_rewards(a(r["logprobs"]), a(r["ref_logprobs"]), a(r["scores"]), a(policy_mask),
                                                kl_coef=settings["kl_coef"], kl_estimator=settings["kl_estimator"],
                                                score_mask=a(score_mask))
    expected_rewards = r["non_score_reward"].copy()
    expected_rewards[np.arange(len(score_mask)), r["actual_end"]] += r["scores"]
    diffs["rewards before whitening"] = _close(rewards, expected_rewards, "rewards")
    for key, trl_key in [("objective/kl", "objective/kl"), ("objective/non_score_reward", "objective/non_score_reward"),
                         ("objective/rlhf_reward", "objective/rlhf_reward"), ("objective/scores", "objective/scores")]:
        diffs[key] = _close(metrics[key], meta["metrics"][trl_key], key)
    if settings.get("whiten_rewards"):
        rewards = ppo.masked_whiten(rewards, a(value_mask), shift_mean=False) * a(value_mask)
    diffs["rewards"] = _close(rewards, r["rewards"], "rewards (whitened where asked)")

    advantages, returns = ppo.ppo_advantages(rewards, a(r["values"]), a(policy_mask), gamma=settings["gamma"],
                                             lam=settings["lam"], value_mask=a(value_mask))
    diffs["returns"] = _close(returns, r["returns"], "returns")
    diffs["advantages"] = _close(advantages, r["advantages"], "whitened advantages")

    per_micro = []
    for number in range(meta["micro_batches"]):
        m = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"micro{number}/")}
        rows = m["micro_batch_inds"]
        index = _index(array_backend[0], rows)
        loss, stats = ppo.ppo_loss(a(m["new_logprobs"]), a(r["logprobs"][rows]), advantages[index], a(m["vpred"]),
                                   a(r["values"][rows]), returns[index], a(policy_mask[rows]),
                                   cliprange=settings["cliprange"], cliprange_value=settings["cliprange_value"],
                                   vf_coef=settings["vf_coef"], value_mask=a(value_mask[rows]))
        diffs["loss"] = max(diffs.get("loss", 0), _close(loss, m["loss"], f"loss, micro-batch {number}"))
        for key, trl_key in [("loss/policy", "pg_loss"), ("loss/value", "vf_loss"), ("policy/clipfrac", "pg_clipfrac"),
                             ("value/clipfrac", "vf_clipfrac")]:
            diffs[key] = max(diffs.get(key, 0), _close(stats[key], m[trl_key], f"{key}, micro-batch {number}"))
        # trl averages these two over every position, padding included (log-ratio 0, ratio 1 there)
        share = policy_mask[rows].mean()
        diffs["approxkl"] = max(diffs.get("approxkl", 0), _close(_numpy(stats["policy/approxkl"]) * share,
                                                                 m["approxkl"], "approxkl"))
        diffs["ratio"] = max(diffs.get("ratio", 0), _close(_numpy(stats["val/ratio"]) * share + 1 - share,
                                                           m["ratio"].mean(), "ratio"))
        per_micro.append({k: _numpy(v) for k, v in stats.items()})
    assert meta["micro_batches"] == 2
    for key, trl_key in [("loss/policy", "loss/policy_avg"), ("loss/value", "loss/value_avg"),
                         ("policy/clipfrac", "policy/clipfrac_avg"), ("value/clipfrac", "val/clipfrac_avg")]:
        diffs[trl_key] = _close(np.mean([s[key] for s in per_micro]), meta["metrics"][trl_key], trl_key)
    # the inputs exercise both clips: the rollout's log-probs are not the update's, the values move between epochs
    assert 0 < meta["metrics"]["policy/clipfrac_avg"] < 1 and 0 < meta["metrics"]["val/clipfrac_avg"] < 1
    print(case, array_backend, {k: f"{v:.1e}" for k, v in diffs.items()})


# ---------------------------------------------------------------- macft's own placement, through the trainer


class _RolloutOnly:
    """PPOLogic.make_rollout's model calls answered with trl's tensors (no model runs here)."""

    def __init__(self, arrays, meta, settings):
        import torch

        from macft.config import PPOConfig
        from macft.rollout import rollout_from_rows

        self.torch = torch
        r = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("rollout/")}
        u = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("unmasked/")}
        self.r, self.u = r, u
        self.args = PPOConfig(response_length=r["responses"].shape[1], seed=0,
                              **settings)
        self.pad_id, self.eos_ids = meta["pad_token_id"], [meta["eos_token_id"]]
        self.sampled = rollout_from_rows(r["responses"].tolist(), self.eos_ids, 1, len(r["responses"]))
        self.policy = types.SimpleNamespace(training=True, eval=lambda: None, train=lambda mode=True: None,
                                            name="policy")
        self.value_model = self.policy
        self.reference = types.SimpleNamespace(name="reference")
        self.step_metrics = {}

    def seed_sampling(self, seed):
        pass

    def sample(self, model, prompts, **settings):
        return self.sampled

    def to_array(self, values, dtype="float32"):
        array = np.asarray(values)
        if dtype == "int32" or array.dtype.kind in "iu":
            return self.torch.as_tensor(array.astype(np.int64))
        if dtype == "bool" or array.dtype == bool:
            return self.torch.as_tensor(array)
        return self.torch.as_tensor(array.astype(np.float64))

    def no_gradient(self):
        return self.torch.no_grad()

    def frozen(self, x):
        return x.detach()

    @contextlib.contextmanager
    def reference_policy(self, policy, reference):
        yield reference

    def policy_logps(self, model, input_ids, starts, completion_ids):
        logps = self.u["logprobs" if model.name == "policy" else "ref_logprobs"][:, :completion_ids.shape[1]]
        return self.to_array(logps), None

    def completion_values(self, value_model, input_ids, starts, width):
        return self.to_array(self.u["values"][:, :width])

    def _score(self, examples, prompt_ids, completions):
        penalty = self.args.missing_eos_penalty or 0.0
        return self.r["scores"].astype(np.float64) + penalty * ~self.r["contain_eos_token"], {}  # before the penalty


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_macft_placement_differs_from_trl_exactly_by_the_off_by_one(trl_runs, case, monkeypatch):
    import macft.trainers.ppo as trainer_module
    from macft.trainers.ppo import PPOLogic

    arrays, meta = trl_runs[case]
    settings = SETTINGS[case[1]]
    stand_in = _RolloutOnly(arrays, meta, settings)
    r, u = stand_in.r, stand_in.u
    recorded = []
    original = trainer_module.kl_penalized_rewards
    monkeypatch.setattr(trainer_module, "kl_penalized_rewards",
                        lambda *a, **k: recorded.append(original(*a, **k)) or recorded[-1])
    examples = [types.SimpleNamespace(prompt_ids=q, prompt="", columns={}) for q in r["queries"].tolist()]
    rollout = PPOLogic.make_rollout(stand_in, examples)
    mask = _numpy(rollout.mask).astype(bool)
    width = mask.shape[1]
    batch = len(mask)
    pad_is_eos = case[0] == "pad-is-eos"

    # post-processing: macft's completion is trl's truncated response through its first EOS
    eos_at = [row.index(EOS) if EOS in row else None for row in r["responses"].tolist()]
    for i, row in enumerate(r["postprocessed_responses"].tolist()):
        kept = row[:eos_at[i] + 1] if eos_at[i] is not None else row
        assert stand_in.sampled.completion_ids[i] == kept
        assert row[len(kept):] == [meta["pad_token_id"]] * (len(row) - len(kept))
    np.testing.assert_array_equal(~np.array(stand_in.sampled.truncated), r["contain_eos_token"])
    trl_policy, trl_value = ~r["padding_mask"][:, :width], ~r["padding_mask_p1"][:, :width]
    expected_policy = mask.copy()
    if pad_is_eos:  # trl's response stops before the EOS
        for i, at in enumerate(eos_at):
            if at is not None:
                expected_policy[i, at] = False
    np.testing.assert_array_equal(trl_policy, expected_policy)

    # rewards: trl's score sits at actual_end; macft's on the completion's last token
    rewards = _numpy(recorded[0][0])
    last = mask.sum(1) - 1
    gamma, lam, beta = settings["gamma"], settings["lam"], settings["kl_coef"]
    log_ratio = u["ref_logprobs"] - u["logprobs"]
    kl = -log_ratio if settings["kl_estimator"] == "k1" else np.expm1(log_ratio) - log_ratio
    trl_rewards = r["non_score_reward"].copy()
    trl_rewards[np.arange(batch), r["actual_end"]] += r["scores"]
    expected_shift = np.zeros_like(trl_rewards)
    moved = []
    for i in range(batch):
        if r["actual_end"][i] != last[i]:  # pad ≠ EOS, EOS before the last position: the score one later
            assert not pad_is_eos and r["actual_end"][i] == last[i] + 1 == eos_at[i] + 1
            expected_shift[i, last[i]] += r["scores"][i]
            expected_shift[i, last[i] + 1] -= r["scores"][i]
            moved.append(i)
        elif pad_is_eos and eos_at[i] is not None:  # same place, but trl has no KL term on the EOS
            expected_shift[i, last[i]] -= beta * kl[i, last[i]]
            moved.append(i)
    assert len(moved) == (7 if pad_is_eos else 6)  # every row with an EOS, but an EOS at the last position
    shift = np.zeros_like(trl_rewards)
    shift[:, :width] = rewards
    shift -= trl_rewards
    max_shift_error = _close(shift, expected_shift, "macft rewards - trl rewards")
    if settings.get("whiten_rewards"):
        return  # the whitening's mean and variance then differ everywhere; the aligned test covers it

    # raw advantages (returns − values): the difference Δ at the last token, discounted back by (γλ)^(L−t)
    raw = _numpy(rollout.returns) - _numpy(rollout.old_values)
    trl_raw = (r["returns"] - r["values"])[:, :width]
    expected = np.zeros_like(raw)
    for i in moved:
        L = last[i]
        if pad_is_eos:
            delta = -beta * kl[i, L]
        else:
            s, v_after = r["scores"][i], r["values"][i, L + 1]
            delta = (1 - gamma * lam) * s - gamma * (1 - lam) * v_after
        expected[i, :L + 1] = delta * (gamma * lam) ** (L - np.arange(L + 1))
    masked_difference = (raw - trl_raw) * mask
    max_adv_error = _close(masked_difference, expected, "macft raw advantages - trl raw advantages")
    assert np.abs(expected).max() > 1e-2  # the placement matters on these inputs
    assert np.all(raw[~mask] == 0) and np.all(_numpy(rollout.advantages)[~mask] == 0)
    print(case, f"rewards shift error {max_shift_error:.1e}, advantage shift error {max_adv_error:.1e}, "
                f"largest shift {np.abs(expected).max():.3f}")
