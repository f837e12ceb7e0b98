"""dpo.py: the loss against a hand computation, the prompt/response boundary of encoded pairs, the
NLL term, and learning a preference on a tiny model through dpo.iteration."""

import copy
import math
import os

import pytest
import torch
from conftest import tiny_model, tiny_run

import configurator
import dpo
import rl
from common import DataError
from dpo import collate_pairs, dpo_loss, encode_pairs
from tinystories import SEPARATOR as END
from tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine


def test_dpo_loss_on_a_hand_example():
    pi_c, pi_r, ref_c, ref_r = (
        torch.tensor([-10.0, -5.0]),
        torch.tensor([-12.0, -4.0]),
        torch.tensor([-11.0, -5.0]),
        torch.tensor([-11.0, -5.0]),
    )
    loss, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # implicit rewards: chosen 0.5 x (1, 0), rejected 0.5 x (-1, 1); margins 1 and -0.5
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.5]
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(0.5))) / 2)


def test_pairs_split_at_the_prompt_and_mask_only_the_responses(small_data):
    tok = Tokenizer(os.path.join(small_data, "tok512.model"))
    pairs = encode_pairs(
        tok, [{"prompt": "Once upon a time, Lily", "chosen": " was happy." + END, "rejected": " ran"}], 64
    )
    ((chosen, rejected, P),) = pairs
    prompt = tok.encode("Once upon a time, Lily", bos=True)
    assert chosen[:P] == rejected[:P] == prompt[:P] and P >= len(prompt) - 1  # at most the prompt's last token merges
    assert chosen[-1] == tok.bos_id and tok.decode(chosen[1:-1]) == "Once upon a time, Lily was happy."
    tokens, mask = collate_pairs(pairs, "cpu")
    assert tokens.shape == (2, len(chosen)) and mask.shape == (2, len(chosen) - 1)
    assert mask[0].tolist() == [0.0] * (P - 1) + [1.0] * (len(chosen) - P)  # position t predicts token t + 1
    assert mask[1].sum() == len(rejected) - P and mask[1, len(rejected) - 1 :].sum() == 0  # not the padding
    with pytest.raises(DataError, match="no pair has a response that fits"):  # no room for a response
        encode_pairs(tok, [{"prompt": "word " * 80, "chosen": " a", "rejected": " b"}], 64)


def test_dpo_learns_a_preference_and_the_nll_term_keeps_the_chosen_likely():
    """chosen responses of even tokens, rejected ones of odd tokens: after a few steps the policy prefers
    held-out even responses over odd ones, which it did not before; with the NLL term (rpo_alpha) the
    training pairs' chosen responses end up more likely than with DPO alone."""
    g = torch.Generator().manual_seed(0)

    def pairs(n):
        out = []
        for _ in range(n):
            prompt = [1] + torch.randint(3, 64, (3,), generator=g).tolist()
            even, odd = (torch.randint(2, 32, (6,), generator=g) * 2 + k for k in (0, 1))
            out.append((prompt + even.tolist(), prompt + odd.tolist(), 4))
        return out

    train, held_out = pairs(64), pairs(32)
    cfg = {**configurator.split(dpo.config)[0], "learning_rate": 3e-3, "beta": 0.1}
    runs = {}
    for rpo_alpha in (0.0, 1.0):
        policy = rl.Policy(tiny_model())
        reference = rl.Policy(copy.deepcopy(policy.model)).requires_grad_(False)
        run = tiny_run(dpo, policy, reference, None, {**cfg, "rpo_alpha": rpo_alpha})
        optimizer = run.optimizer

        def measure(pairs):  # the statistics of a step that changes nothing
            run.optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
            stats = dpo.iteration(run, pairs)
            run.optimizer = optimizer
            return stats

        first = measure(held_out)
        for step in range(30):
            dpo.iteration(run, train[step % 4 * 16 :][:16])
        runs[rpo_alpha] = first, measure(held_out), measure(train)
    for first, last, _ in runs.values():
        assert first["rewards/margins"] == 0.0 and first["loss"] == pytest.approx(math.log(2))  # policy == reference
        assert last["rewards/accuracies"] > 0.9 and last["loss"] < 0.5 * math.log(2)
    assert runs[1.0][2]["logps/chosen"] > runs[0.0][2]["logps/chosen"] + 0.3  # measured: -19.4 against -20.3
