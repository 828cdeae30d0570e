"""The instruction contrast's sibling instructions (which samples have one, and the one drawn per batch row), its
region (the tokens some branch moves) and the objective that joins them."""

import numpy as np
import pytest
import torch

from traj_forecast_ros.data.dataset import NO_BRANCH_GROUP
from traj_forecast_ros.train.flow import FlowObjective, branch_moving_maps, crossed_instructions, pick_crossed


def test_siblings_are_the_other_instructions_of_a_branch_group():
    groups = np.array([0, 0, NO_BRANCH_GROUP, 1, 1, 1, 2, 2])
    instructions = np.array([3, 4, 3, 5, 6, 5, 7, 7])  # group 2: both branches under one instruction
    siblings = crossed_instructions(groups, instructions)
    assert [s.tolist() for s in siblings] == [[4], [3], [], [6], [5], [6], [], []]
    picked, found = pick_crossed(siblings, np.array([0, 2, 4, 4, 6]), seed=(0, 1))
    assert found.tolist() == [True, False, True, True, False]
    assert picked[found].tolist() == [4, 5, 5]
    again, _ = pick_crossed(siblings, np.array([0, 2, 4, 4, 6]), seed=(0, 1))
    assert np.array_equal(picked, again)  # deterministic in the seed: a resumed run draws the same


class TextReadingField(torch.nn.Module):
    """Velocity: the instruction embedding's first value everywhere (reads the instruction, nothing else)."""

    def forward(self, x, t, frame_features, text_embeds=None):
        return torch.zeros_like(x) + text_embeds[:, :1, None, None, None]


ONE_MOVING_TOKEN = torch.tensor([[[True, False], [False, False]]] * 2)  # (B, h, w): the region of both rows


def _objective_losses(text_dropout: float, branch_moving=ONE_MOVING_TOKEN, **objective_options) -> dict:
    from traj_forecast_ros.model.word_encoder import WordTextEncoder, build_vocabulary

    instructions = ["push the cube to the left", "push the cube to the right"]
    torch.manual_seed(0)
    encoder = WordTextEncoder(build_vocabulary(instructions), embed_dim=4, width=8, heads=2)
    objective = FlowObjective(TextReadingField(), [1.0, 1.0], (2, 2), latent_draw="mean", text_encoder=encoder,
                              text_dropout=text_dropout, instruction_contrast=0.5, **objective_options)
    ids = encoder.tokenize(instructions)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 2, generator=gen)  # (B, T, L, C)
    return objective(mean, torch.zeros_like(mean), mean[:, :1], torch.zeros_like(mean[:, :1]),
                     torch.zeros(2, 1, 1), text_ids=ids, crossed_text_ids=ids.flip(0),
                     crossed=torch.ones(2, dtype=torch.bool), generator=torch.Generator().manual_seed(1),
                     branch_moving=branch_moving)


def test_the_contrast_joins_the_loss_unless_the_instruction_is_dropped():
    kept = _objective_losses(text_dropout=0.0)
    assert kept["contrast"].item() > 0 and torch.isfinite(kept["loss"])
    torch.testing.assert_close(kept["loss"], kept["flow"] + 0.5 * kept["contrast"])
    dropped = _objective_losses(text_dropout=1.0)  # every own instruction dropped: nothing to contrast
    assert dropped["contrast"].item() == 0.0
    torch.testing.assert_close(dropped["loss"], dropped["flow"])


def test_branch_moving_maps_join_the_moving_tokens_of_a_branch_group():
    """The region of the contrast: per example, the tokens that move in any example of its scene's branch group."""
    moving = np.zeros((5, 2, 2), bool)
    moving[0, 0, 0] = moving[1, 1, 1] = moving[2, 0, 1] = moving[3, 1, 0] = True
    scenes = np.array([0, 1, 2, 3, 4])  # examples 0, 1 and 4 share group 7; example 2 has no group
    groups = np.array([7, 7, NO_BRANCH_GROUP, 8, 7])
    union = branch_moving_maps(moving, scenes, groups)
    joined = moving[0] | moving[1]
    for example in (0, 1, 4):
        assert np.array_equal(union[example], joined)  # example 4 moves nothing itself: its siblings' tokens
    assert np.array_equal(union[2], moving[2]) and np.array_equal(union[3], moving[3])
    assert not moving[4].any()  # the input is not changed


def test_the_contrast_temperature_scales_the_error_gap():
    """contrast = mean softplus(gap / temperature) over the rows, on the same noised inputs whatever the temperature:
    the gap recovered at one temperature gives the contrast at another (one row: the other moves no token,
    so it leaves the contrast). Non-positive temperatures are refused."""
    first_row_moves = torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]]])
    cold = _objective_losses(0.0, first_row_moves, contrast_on_motion=True, contrast_temperature=0.01)
    warm = _objective_losses(0.0, first_row_moves, contrast_on_motion=True, contrast_temperature=0.5)
    torch.testing.assert_close(cold["flow"], warm["flow"])
    gap = 0.01 * torch.log(torch.expm1(cold["contrast"]))  # invert softplus(gap / 0.01) for the one row
    torch.testing.assert_close(warm["contrast"], torch.nn.functional.softplus(gap / 0.5))
    with pytest.raises(ValueError, match="contrast_temperature"):
        _objective_losses(0.0, contrast_temperature=0.0)


def test_the_crossed_still_term_joins_the_loss_and_needs_the_contrast_region():
    """loss = flow + contrast weight * contrast + crossed-still weight * crossed_still; the options are refused
    without the contrast, crossed_still without contrast_on_motion, and contrast_on_motion without the maps."""
    losses = _objective_losses(0.0, contrast_on_motion=True, crossed_still=2.0)
    assert losses["crossed_still"].item() > 0
    torch.testing.assert_close(losses["loss"], losses["flow"] + 0.5 * losses["contrast"] + 2.0 * losses["crossed_still"])
    plain = _objective_losses(0.0)
    assert "crossed_still" not in plain
    torch.testing.assert_close(plain["flow"], losses["flow"])  # the same noised inputs and own pass
    with pytest.raises(ValueError, match="needs contrast_on_motion"):
        _objective_losses(0.0, crossed_still=1.0)
    with pytest.raises(ValueError, match="refine the instruction contrast"):
        FlowObjective(TextReadingField(), [1.0], (2, 2), contrast_on_motion=True)
    with pytest.raises(ValueError, match="branch_moving"):
        _objective_losses(0.0, branch_moving=None, contrast_on_motion=True)
