"""RL pieces: group advantages, rewards, GRPO's zero-signal step, DPO at the reference, pairs."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from lmforge.data.chats import ChatSet, Conversation, build
from lmforge.data.mathgen import check_equations, extract_answer
from lmforge.model import GPT, ModelConfig
from lmforge.rl import dpo, grpo
from lmforge.rl.pairs import Pair, PairError, build_pairs, check_pair, corrupt
from lmforge.rl.rewards import reward
from lmforge.rl.stage import paired_gain
from lmforge.train.config import TrainConfig
from lmforge.train.dist import Dist
from lmforge.train.loop import fit

CPU = Dist(0, 1, 0, torch.device("cpu"))
SETS = [ChatSet(name="drills", kind="drill", n=60, max_operand=20), ChatSet(name="w", kind="math_word", n=20)]


@pytest.fixture(scope="module")
def enc(math_encoder):  # type: ignore[no-untyped-def]
    return math_encoder


def tiny(enc) -> GPT:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cfg = ModelConfig.from_depth(2, enc.n_vocab, head_dim=16, aspect_ratio=16, max_seq_len=128)
    model = GPT(cfg)
    # a non-trivial policy: output projections start at zero, give them weights
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02)
    return model


def test_group_advantages_sum_to_zero_per_group() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (64, 8), generator=g).float() + 0.1 * torch.rand(64, 8, generator=g)
    for scale in (True, False):
        adv = grpo.group_advantages(r, scale=scale)
        assert torch.allclose(adv.sum(1), torch.zeros(64), atol=1e-5)
    equal = grpo.group_advantages(torch.ones(3, 4))
    assert torch.equal(equal, torch.zeros(3, 4))  # no signal, no NaN


def test_reward_is_exact_answer_plus_format() -> None:
    assert reward("2 + 3 = 5\n#### 5", 5, format_weight=0.1) == pytest.approx(1.1)
    assert reward("2 + 3 = 6\n#### 6", 5, format_weight=0.1) == pytest.approx(0.1)
    assert reward("it is 5", 5, format_weight=0.1) == 0.0


def _rollouts(model, enc, problems, **kw):  # type: ignore[no-untyped-def]
    args = {"prompts_per_step": 4, "group_size": 4, "temperature": 1.0, "top_k": None, "max_new_tokens": 12,
            "format_weight": 0.0, "scale": True, "ppo_epochs": 1, "seed": 3} | kw
    return grpo.Rollouts(model, copy.deepcopy(model).eval(), enc, problems, **args)


def _cfg(steps: int, global_batch: int, micro_batch: int) -> TrainConfig:
    return TrainConfig(steps=steps, global_batch=global_batch, micro_batch=micro_batch, seq_len=64, progress=False,
                       ckpt_every=100, eval_every=100)


def test_zero_reward_everywhere_leaves_the_weights_unchanged(enc) -> None:  # type: ignore[no-untyped-def]
    # answers no reply can give: every reward is 0
    problems = [Conversation(c.id, c.source, c.turns, 10**9) for c in build(SETS[:1], 2)]
    for matrix in ("muon", "adamw"):
        model = tiny(enc)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        data = _rollouts(model, enc, problems)
        cfg = _cfg(3, 16, 8).model_copy(update={"optim": _cfg(1, 16, 8).optim.model_copy(update={"matrix": matrix})})
        fit(model, grpo.objective(clip=0.2, kl_coef=0.05), data, cfg, dist=CPU, total_steps=3, d_model=32)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), matrix


def test_rewarded_replies_move_the_policy(enc) -> None:  # type: ignore[no-untyped-def]
    problems = build(SETS[:1], 2)
    model = tiny(enc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _rollouts(model, enc, problems, format_weight=1.0)  # any reply ending in "#### N" earns 1
    batches = data.next_step(16, 8)
    x = batches[0]
    assert set(x) == {"inputs", "targets", "adv", "old", "ref"}
    assert torch.equal(x["old"], x["ref"])  # the policy is the reference before any update
    # targets are exactly the reply tokens: after the prompt's <|assistant_start|>
    start = enc.encode_single_token("<|assistant_start|>")
    for inp, tgt in zip(x["inputs"], x["targets"], strict=True):
        first = int((tgt != -1).nonzero()[0])
        assert int(inp[first]) == start

    # a positive advantage makes its reply more likely, a negative one less
    prompt = [0] + enc.encode_ordinary("What is 2 + 3?")
    good, bad = enc.encode_ordinary("2 + 3 = 5\n#### 5"), enc.encode_ordinary("2 + 3 = 9\n#### 9")
    xs, ys = grpo.rows([prompt, prompt], [good, bad])
    with torch.no_grad():
        old = grpo.token_logps(model, xs, ys)
    batch = {"inputs": xs, "targets": ys, "adv": torch.tensor([1.0, -1.0]), "old": old, "ref": old}
    grpo.objective(clip=0.2, kl_coef=0.1).loss(model, batch).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        new = grpo.token_logps(model, xs, ys).sum(1)
    assert new[0] > old.sum(1)[0] and new[1] < old.sum(1)[1]
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dpo_loss_is_log_2_when_policy_is_the_reference(enc) -> None:  # type: ignore[no-untyped-def]
    model = tiny(enc)
    pairs = build_pairs(build(SETS, 4), seed=0)[:6]
    data = dpo.PairBatches(enc, pairs, model, seed=0, micro_batch=3)
    obj = dpo.objective(beta=0.5)
    for batch in data.next_step(6, 3):
        loss = obj.loss(model, batch) / obj.count(batch)
        assert math.isclose(float(loss.detach()), math.log(2), rel_tol=1e-6)


def test_dpo_raises_the_margin_on_its_pairs(enc) -> None:  # type: ignore[no-untyped-def]
    model = tiny(enc)
    pairs = build_pairs(build(SETS, 4), seed=0)[:16]
    before = dpo.margin(model, enc, pairs, 8)
    data = dpo.PairBatches(enc, pairs, copy.deepcopy(model), seed=0, micro_batch=8)
    fit(model, dpo.objective(beta=0.5), data, _cfg(10, 16, 8), dist=CPU, total_steps=10, d_model=32)
    assert dpo.margin(model, enc, pairs, 8) > before + 0.1


def test_pairs_are_verifiably_right_and_wrong() -> None:
    convs = build(SETS, 5)
    pairs = build_pairs(convs, seed=1)
    assert len(pairs) == len(convs)
    for p, c in zip(pairs, convs, strict=True):
        assert extract_answer(p.chosen) == c.answer and not check_equations(p.chosen)
        assert extract_answer(p.rejected) != c.answer and check_equations(p.rejected)
    assert build_pairs(convs, seed=1) == pairs
    bad = corrupt("12 + 30 = 42\n#### 42", 42, random.Random(0))
    wrong = extract_answer(bad)
    assert wrong is not None and wrong != 42 and bad == f"12 + 30 = {wrong}\n#### {wrong}"


def test_identical_chosen_and_rejected_is_an_error_naming_the_pair() -> None:
    with pytest.raises(PairError, match="pair prefs-7: chosen and rejected replies are identical"):
        check_pair(Pair("prefs-7", [("user", "q")], "#### 1", "#### 1"))


def test_paired_gain_and_its_standard_error() -> None:
    gain, se = paired_gain([False] * 100, [True] * 30 + [False] * 70)
    assert gain == pytest.approx(0.3) and se == pytest.approx(math.sqrt(0.3 * 0.7 * 100 / 99 / 100))


def _pairs_file(tmp_path, lines):  # type: ignore[no-untyped-def]
    import json

    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return f


GOOD_PAIR = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "2 + 3 = 5\n#### 5",
             "rejected": "2 + 3 = 6\n#### 6"}


@pytest.mark.parametrize(("line", "needle"), [
    ({**GOOD_PAIR, "rejected": GOOD_PAIR["chosen"]}, "chosen and rejected replies are identical"),
    ({**GOOD_PAIR, "messages": [{"role": "critic", "content": "x"}]}, "unknown role 'critic'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'messages'"),
    ({**GOOD_PAIR, "chosen": 5}, "field 'chosen' must be a string"),
])
def test_bad_preference_files_name_the_record(tmp_path, line, needle) -> None:  # type: ignore[no-untyped-def]
    from lmforge.errors import LmforgeError
    from lmforge.rl.pairs import read_pairs

    f = _pairs_file(tmp_path, [GOOD_PAIR, line])
    with pytest.raises(LmforgeError, match=needle) as e:
        read_pairs(f)
    assert f"{f}:2" in str(e.value)
    assert read_pairs(_pairs_file(tmp_path, [GOOD_PAIR]))[0].prompt == [("user", "What is 2 + 3?")]


def test_ppo_epochs_reuse_a_rollout_and_resume_between_rollouts(enc) -> None:  # type: ignore[no-untyped-def]
    problems = build(SETS[:1], 2)
    model = tiny(enc)
    data = _rollouts(model, enc, problems, ppo_epochs=2)
    a, b, c = data.next_step(16, 8), data.next_step(16, 8), data.next_step(16, 8)
    assert a is b and c is not a and data.state_dict()["draw"] == 2
    # a fresh source resumed at the same draw samples the same prompts
    again = _rollouts(model, enc, problems, ppo_epochs=2)
    again.load_state_dict({"draw": 1, "seed": 3})
    assert [p.id for p in again._problems(1)] == [p.id for p in data._problems(1)]
    with pytest.raises(ValueError, match="prompts_per_step x group_size"):
        data.next_step(8, 8)
