"""Two attribution maps side by side: the difference B minus A and the tokens that gained and lost most.

A map is the plain-JSON record the TensorBoard sink writes beside each page
(:func:`inseq_lightning.sinks.render.map_record`): ``rows`` (context tokens, readable), ``columns``
(attributed tokens), ``scores`` ``[rows][columns]`` (None where a token did not exist yet at that
step), the raw ``row_tokens`` and ``column_tokens``, ``step_scores`` and ``values`` (every value the
pass logged for the probe). The compare view of the Attributions tab and the ``drift`` command's
report both compare maps with :func:`compare_maps`. Standard library only: the TensorBoard server
imports this module.
"""

TOP_TOKENS = 5  # the tokens listed as gaining and losing most


def token_mismatch(a: dict, b: dict) -> str | None:
    """Why the maps ``a`` and ``b`` cannot be subtracted cell by cell (None: they have the same tokens)."""
    for side, what in (("row_tokens", "context tokens (rows)"), ("column_tokens", "attributed tokens (columns)")):
        left, right = list(a.get(side, [])), list(b.get(side, []))
        if left == right:
            continue
        if len(left) != len(right):
            return (f"The two maps have different {what}: {len(left)} at step {a.get('step')}, {len(right)} at step "
                    f"{b.get('step')}. No difference map: it needs the same tokens on both sides.")
        first = next(i for i, (x, y) in enumerate(zip(left, right)) if x != y)
        return (f"The two maps have different {what}: token {first} is {left[first]!r} at step {a.get('step')} and "
                f"{right[first]!r} at step {b.get('step')}. No difference map: it needs the same tokens on both sides.")
    return None


def compare_maps(a: dict, b: dict, top: int = TOP_TOKENS) -> dict:
    """B minus A on the aggregated maps, when both have the same tokens.

    Returns ``{"mismatch": str | None, "difference": [[float | None]] | None, "limit": float,
    "gained": [...], "lost": [...]}``. ``difference[i][j] = b[i][j] - a[i][j]`` (None where either
    is undefined); ``limit``: the largest absolute difference (the colour scale's end). ``gained`` /
    ``lost``: up to ``top`` context tokens whose attribution summed over the attributed tokens rose /
    fell most, largest change first, each ``{"row", "token", "a", "b", "change"}`` (``change = b - a``
    over the cells defined on both sides). When the tokens differ, ``mismatch`` says how, and there
    is no difference and no token list.
    """
    mismatch = token_mismatch(a, b)
    if mismatch is not None:
        return {"mismatch": mismatch, "difference": None, "limit": 0.0, "gained": [], "lost": []}
    difference = [[None if x is None or y is None else y - x for x, y in zip(row_a, row_b)]
                  for row_a, row_b in zip(a["scores"], b["scores"])]
    totals = []
    for i, (row_a, row_b) in enumerate(zip(a["scores"], b["scores"])):
        pairs = [(x, y) for x, y in zip(row_a, row_b) if x is not None and y is not None]
        if pairs:
            total_a, total_b = sum(x for x, _ in pairs), sum(y for _, y in pairs)
            totals.append({"row": i, "token": a["rows"][i], "a": total_a, "b": total_b, "change": total_b - total_a})
    gained = sorted((t for t in totals if t["change"] > 0), key=lambda t: -t["change"])[:top]
    lost = sorted((t for t in totals if t["change"] < 0), key=lambda t: t["change"])[:top]
    limit = max((abs(v) for row in difference for v in row if v is not None), default=0.0)
    return {"mismatch": None, "difference": difference, "limit": limit, "gained": gained, "lost": lost}
