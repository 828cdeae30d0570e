"""The instruction contrast's sibling instructions: which samples have one, and the one drawn per batch row."""

import numpy as np
import torch

from traj_forecast_ros.data.dataset import NO_BRANCH_GROUP
from traj_forecast_ros.train.flow import FlowObjective, crossed_instructions, pick_crossed


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


def _objective_losses(text_dropout: float) -> dict:
    from traj_forecast_ros.model.word_encoder import WordTextEncoder, build_vocabulary

    instructions = ["push the cube to the left", "push the cube to the right"]
    torch.manual_seed(0)
    encoder = WordTextEncoder(build_vocabulary(instructions), embed_dim=4, width=8, heads=2)
    objective = FlowObjective(TextReadingField(), [1.0, 1.0], (2, 2), latent_draw="mean", text_encoder=encoder,
                              text_dropout=text_dropout, instruction_contrast=0.5)
    ids = encoder.tokenize(instructions)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 3, 4, 2, generator=gen)  # (B, T, L, C)
    return objective(mean, torch.zeros_like(mean), mean[:, :1], torch.zeros_like(mean[:, :1]),
                     torch.zeros(2, 1, 1), text_ids=ids, crossed_text_ids=ids.flip(0),
                     crossed=torch.ones(2, dtype=torch.bool), generator=torch.Generator().manual_seed(1))


def test_the_contrast_joins_the_loss_unless_the_instruction_is_dropped():
    kept = _objective_losses(text_dropout=0.0)
    assert kept["contrast"].item() > 0 and torch.isfinite(kept["loss"])
    torch.testing.assert_close(kept["loss"], kept["flow"] + 0.5 * kept["contrast"])
    dropped = _objective_losses(text_dropout=1.0)  # every own instruction dropped: nothing to contrast
    assert dropped["contrast"].item() == 0.0
    torch.testing.assert_close(dropped["loss"], dropped["flow"])
