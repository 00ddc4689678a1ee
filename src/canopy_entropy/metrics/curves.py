"""Per-step curves of the single scan, per group: the running entropy rate of Figure 1."""

from __future__ import annotations

import numpy as np
import pandas as pd

from canopy_entropy.run.layout import GROUP_KEYS

RUNNING_RATE_COLUMNS = (*GROUP_KEYS, "position", "mean_rate", "n_active")


def running_rate(
    key_frame: pd.DataFrame,
    code: np.ndarray,
    length: np.ndarray,
    H: np.ndarray,
    entropy_steps: list[np.ndarray],
) -> pd.DataFrame:
    """At position t (1-based), the mean prefix rate ``sum_{s<=t} H_s / t`` over the rollouts
    with ``N >= t`` (``n_active`` of them), one row per (group, position).

    From per-rollout totals and the per-prompt sums ``A(s) = sum_i H_is`` of the scan: the
    prefix sums of the active rollouts at t are ``cumsum(A)(t)`` minus the totals ``H_i`` of
    the rollouts that ended before t, so no per-step pass is needed here. ``key_frame`` holds
    the prompts (sorted by key), ``code`` each rollout's prompt row.
    """
    groups = key_frame[list(GROUP_KEYS)]
    # prompts are sorted by key, so group codes follow the sorted group keys
    prompt_group = groups.groupby(list(GROUP_KEYS), sort=False).ngroup().to_numpy()
    gcode, first = np.unique(prompt_group, return_index=True)
    rollout_group = prompt_group[code]
    length = length.astype(np.int64)
    frames = []
    for g, row in zip(gcode, first, strict=True):  # loop over groups only
        mine = rollout_group == g
        n, h = length[mine], H[mine]
        width = int(n.max())
        steps = np.zeros(width)
        for p in np.flatnonzero(prompt_group == g):  # loop over the group's prompts
            steps[: entropy_steps[p].size] += entropy_steps[p]
        ended_at = np.bincount(n, minlength=width + 1)  # rollouts of length exactly t
        active = n.size - np.cumsum(ended_at)[:-1]  # N >= t for t = 1..width
        # totals of the rollouts that ended before t: lengths 1..t-1
        done = np.cumsum(np.bincount(n, weights=h, minlength=width + 1))[:-1]
        position = np.arange(1, width + 1)
        frame = pd.DataFrame(
            {
                "position": position,
                "mean_rate": (np.cumsum(steps) - done) / position / active,
                "n_active": active.astype(np.int64),
            }
        )
        for name in GROUP_KEYS:
            frame[name] = groups[name].iloc[row]
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=list(RUNNING_RATE_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(RUNNING_RATE_COLUMNS)]
