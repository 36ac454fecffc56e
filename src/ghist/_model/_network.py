"""The GHIST network (``docs/method.md``, "The network"): a plain :class:`torch.nn.Module`, tensors in, tensors out.

Batch contract (what the tile collate function produces and :meth:`GHISTNetwork.forward` consumes):

``image``
    ``(B, 3, T, T)`` float32, channel-standardised.
``labels``
    ``(B, T, T)`` int64: 0 background, ``1..N`` batch-unique nucleus ids (cell ``k`` of the batch has id
    ``k + 1``), ``-1`` ignore (not pooled, ignored by the pixel loss).
``cell_batch``
    ``(N,)`` int64, the tile index of each cell.
``n_cells``
    ``N``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_int
from ._backbone import UNet3Plus, fuse_conv_bn_
from ._context import NeighbourContext, cell_centroids
from ._readout import ResidualReadout
from ._spec import DEFAULT_OUTPUT_ACTIVATION, ArchitectureSpec

logger = logging.getLogger(__name__)

__all__ = [
    "ExpressionHead",
    "ExpressionTypeHead",
    "GHISTNetwork",
    "neighbourhood_refine",
    "segment_pool",
    "specialist_expression",
]


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


def segment_pool(maps: Sequence[torch.Tensor], labels: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of feature maps over each nucleus' pixels, for all nuclei of a batch in one segment reduction.

    Only foreground pixels are gathered (one row gather per map), then a single ``index_add_`` sums them per
    nucleus and ``bincount`` counts them; there is no loop over cells.

    Parameters
    ----------
    maps
        Feature maps ``(B, C_k, H, W)`` at the labels' resolution (any memory format, any float dtype).
    labels
        ``(B, H, W)`` int64 batch-unique nucleus ids ``1..n_cells``; ``0`` and negative values are not pooled.
    n_cells
        Number of nuclei ``N``.

    Returns
    -------
    ``(means, area)``: ``(N, sum_k C_k)`` float32 per-nucleus means (zeros for a nucleus with no visible pixel)
    and ``(N,)`` int64 visible pixel counts.

    Examples
    --------
    >>> maps = [torch.arange(8.0).reshape(1, 2, 2, 2)]
    >>> labels = torch.tensor([[[1, 1], [0, 2]]])
    >>> segment_pool(maps, labels, 2)[0]
    tensor([[0.5000, 4.5000],
            [3.0000, 7.0000]])

    """
    _, h, w = labels.shape
    flat = labels.reshape(-1)
    fg = torch.nonzero(flat > 0).squeeze(1)
    seg = flat.index_select(0, fg) - 1
    b_idx, p_idx = fg // (h * w), fg % (h * w)
    # (B, C, H, W) -> (B, H*W, C): a view for channels_last maps, a strided one otherwise; only fg rows are read.
    rows = torch.cat([m.flatten(2).transpose(1, 2)[b_idx, p_idx].float() for m in maps], dim=1)
    sums = rows.new_zeros(n_cells, rows.shape[1]).index_add_(0, seg, rows)
    area = torch.bincount(seg, minlength=n_cells)
    return sums / area.clamp(min=1).unsqueeze(1).to(sums.dtype), area


def _segment_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the rows of ``values`` per ``index`` value in ``0..n-1`` (zeros where empty) and the counts."""
    sums = values.new_zeros(n, values.shape[1]).index_add_(0, index, values)
    counts = torch.bincount(index, minlength=n)
    return sums / counts.clamp(min=1).unsqueeze(1).to(values.dtype), counts


OUTPUT_ACTIVATIONS = {"softplus": F.softplus, "relu": F.relu}


def check_output_activation(name: str):
    """The function an ``output_activation`` name stands for; a ValueError naming the choices for another name."""
    if name not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"`output_activation` must be one of {sorted(OUTPUT_ACTIVATIONS)}; got {name!r}.")
    return OUTPUT_ACTIVATIONS[name]


def nucleus_morphometrics(
    first_level: torch.Tensor, labels: torch.Tensor, n_cells: int, cell_means: torch.Tensor, area: torch.Tensor
) -> torch.Tensor:
    """``(N, C + 1)``: each nucleus' feature standard deviation over its pixels (C channels), and ``log1p(area)``.

    ``first_level`` is the ``(B, C, T, T)`` full-resolution backbone map whose per-nucleus means are the last ``C``
    columns of ``cell_means``; ``area`` the visible pixels per nucleus (:func:`segment_pool`'s counts).
    """
    channels = first_level.shape[1]
    squares, _ = segment_pool([first_level.float().square()], labels, n_cells)
    means = cell_means[:, -channels:].float()
    spread = (squares - means.square()).clamp(min=0.0).add(1e-6).sqrt()
    return torch.cat([spread, torch.log1p(area.float()).unsqueeze(1)], dim=1)


class ExpressionHead(nn.Module):
    """First expression estimate from the cell embedding, refined by cross-attention (``docs/method.md``).

    With a reference, an MLP with softmax gives each cell weights over the ``R`` profiles and the first estimate
    is the weighted mixture of profiles; without, an MLP gives it directly. The first estimate is tokenised by a
    linear map into ``n_tokens`` tokens of ``token_dim`` (keys/values); the query (estimated tile composition, or
    the tile-mean embedding without cell types) is mapped to ``n_tokens`` query tokens; multi-head cross-attention
    output is flattened and projected back to the genes as an offset (zero-initialised, so training starts from
    the first estimate), and ``expr = activation(first + offset)``.

    The activation keeps expression non-negative. ``"softplus"`` (the default with cell-level targets, see
    :func:`ghist._model._spec.default_output_activation`) has a gradient everywhere;
    ``"relu"`` (what models saved before the choice existed use) can leave a gene at zero in every cell for good
    once its pre-activation is negative everywhere, as happens to many genes of ``synthetic(signals="all")``
    (``docs/benchmarks.md``).

    Parameters
    ----------
    embed_dim
        Size of the cell embedding.
    n_genes
        Number of genes ``G``.
    query_dim
        Size of the per-cell query input (number of cell types, or ``embed_dim``).
    n_profiles
        Number of reference profiles ``R``, or ``None`` without a reference.
    hidden
        Hidden width of the first-estimate MLP.
    n_tokens
        Query and key/value tokens per cell.
    token_dim
        Attention width.
    n_heads
        Attention heads (must divide ``token_dim``).
    dropout
        Dropout in the MLP and the attention.
    activation
        ``"softplus"`` or ``"relu"``, the output non-linearity.
    cell_offset
        Add a linear map of the cell's own embedding to the offset (zero-initialised). With a reference the first
        estimate is a mixture of reference profiles and the attention sees only that mixture and the tile
        composition: without this path nothing distinguishes two cells with the same mixture, e.g. a cycling and a
        resting cell of one type.

    """

    def __init__(
        self,
        embed_dim: int,
        n_genes: int,
        query_dim: int,
        *,
        n_profiles: int | None = None,
        hidden: int = 256,
        n_tokens: int = 8,
        token_dim: int = 256,
        n_heads: int = 8,
        dropout: float = 0.1,
        activation: str = DEFAULT_OUTPUT_ACTIVATION["cells"],
        cell_offset: bool = False,
    ):
        super().__init__()
        self.activation = check_output_activation(activation)
        self.n_tokens, self.token_dim = n_tokens, token_dim
        self.first = _mlp(embed_dim, hidden, n_profiles if n_profiles else n_genes, dropout)
        self.uses_reference = bool(n_profiles)
        self.to_kv = nn.Linear(n_genes, n_tokens * token_dim)
        self.kv_norm = nn.LayerNorm(token_dim)
        self.to_query = nn.Linear(query_dim, n_tokens * token_dim)
        self.query_norm = nn.LayerNorm(token_dim)
        self.attention = nn.MultiheadAttention(token_dim, n_heads, dropout=dropout, batch_first=True)
        self.to_offset = nn.Linear(n_tokens * token_dim, n_genes)
        nn.init.zeros_(self.to_offset.weight)
        nn.init.zeros_(self.to_offset.bias)
        self.cell_offset: nn.Linear | None = nn.Linear(embed_dim, n_genes) if cell_offset else None
        if self.cell_offset is not None:
            nn.init.zeros_(self.cell_offset.weight)
            nn.init.zeros_(self.cell_offset.bias)

    def forward(
        self, embedding: torch.Tensor, query: torch.Tensor, reference: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(expr, first_estimate, profile_weights)``, shapes ``(N, G)``, ``(N, G)``, ``(N, R)`` or None."""
        weights = None
        if self.uses_reference:
            if reference is None:
                raise ValueError("This expression head was built for a reference; pass `reference` (R x G).")
            weights = torch.softmax(self.first(embedding), dim=-1)
            first = weights @ reference.to(weights.dtype)
        else:
            first = self.first(embedding)
        n = embedding.shape[0]
        if n == 0:
            return self.activation(first), first, weights
        kv = self.kv_norm(self.to_kv(first).reshape(n, self.n_tokens, self.token_dim))
        q = self.query_norm(self.to_query(query).reshape(n, self.n_tokens, self.token_dim))
        attended, _ = self.attention(q, kv, kv, need_weights=False)
        offset = self.to_offset(attended.reshape(n, self.n_tokens * self.token_dim))
        if self.cell_offset is not None:
            offset = offset + self.cell_offset(embedding)
        return self.activation(first + offset), first, weights


class ExpressionTypeHead(nn.Module):
    """MLP classifying cell type from an expression vector (``docs/method.md``).

    ``forward(expr)`` returns ``(features, logits)``: the last hidden layer (after ReLU) and the class logits.
    """

    def __init__(self, n_genes: int, n_types: int, *, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Linear(n_genes, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(hidden, n_types)

    def forward(self, expr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(expr)
        return features, self.classifier(features)


class GHISTNetwork(nn.Module):
    """The GHIST network: UNet3+ backbone, per-nucleus embedding and the cell-level heads (``docs/method.md``).

    Parameters
    ----------
    n_genes
        Number of genes ``G`` predicted per cell.
    n_types
        Number of cell types ``T``; ``0`` trains without cell types (the pixel map is then nucleus vs
        background, and there is no cell-type, composition or expression-to-type head).
    reference
        ``(R, G)`` reference expression profiles on the network's target scale (``expr_scale * log1p``), or
        ``None`` to predict the first expression estimate directly. Kept as the buffer ``reference``.
    groups
        Specialist groups, ``name -> cell type indices``; each gets its own expression head. Names must be
        non-empty and contain no ``"."``.
    spec
        The model's :class:`~ghist._model._spec.ArchitectureSpec` (width, embedding size, context, activation,
        morphometrics, cell offset, readout: documented there), or ``None`` for its defaults.
    hidden
        Hidden width of the heads' MLPs (the embedding MLP uses ``2 * hidden``).
    n_tokens
        Tokens per cell in the expression refinement's cross-attention.
    n_heads
        Attention heads (must divide ``embed_dim``).
    dropout
        Dropout in the heads.
    upsample_first
        Passed to :class:`~ghist._model._backbone.UNet3Plus` (``False``: convolve deep maps before upsampling).
    encoder
        Optional custom encoder for the backbone, see :class:`~ghist._model._backbone.UNet3Plus`.
    feature_encoder
        Optional :class:`~ghist._model._encoder.FeatureEncoder` (a pretrained encoder's per-nucleus features),
        concatenated to the embedding MLP's input.
    **settings
        Fields of the :class:`~ghist._model._spec.ArchitectureSpec` replacing those of ``spec`` (e.g.
        ``width=16``). The readout (``readout=True``) is added to the expression (then clipped at 0) and zero until
        fitted after training (:func:`~ghist._model._readout.fit_readout`); the specialist heads' expressions are
        left as they are.

    Examples
    --------
    >>> net = GHISTNetwork(n_genes=5, n_types=3, width=4, embed_dim=16, hidden=16, n_heads=2).eval()
    >>> image = torch.randn(1, 3, 32, 32)
    >>> labels = torch.zeros(1, 32, 32, dtype=torch.long)
    >>> labels[0, 4:9, 4:9], labels[0, 20:25, 10:15] = 1, 2
    >>> out = net(image, labels, torch.zeros(2, dtype=torch.long), 2)
    >>> out["expr"].shape, out["cell_logits"].shape, out["composition"].shape
    (torch.Size([2, 5]), torch.Size([2, 3]), torch.Size([1, 3]))

    """

    def __init__(
        self,
        n_genes: int,
        n_types: int,
        *,
        reference: torch.Tensor | None = None,
        groups: Mapping[str, Sequence[int]] | None = None,
        spec: ArchitectureSpec | None = None,
        hidden: int = 256,
        n_tokens: int = 8,
        n_heads: int = 8,
        dropout: float = 0.1,
        upsample_first: bool = False,
        encoder: nn.Module | None = None,
        feature_encoder: nn.Module | None = None,
        **settings: Any,
    ):
        super().__init__()
        # checked before anything is built
        spec = ArchitectureSpec.build(**settings) if spec is None else spec.replace(**settings) if settings else spec
        self.spec = spec
        width, embed_dim = spec.width, spec.embed_dim
        check_int("n_genes", n_genes, 1)
        check_int("n_types", n_types, 0)
        if embed_dim % n_heads:
            raise ValueError(f"`n_heads` ({n_heads}) must divide `embed_dim` ({embed_dim}).")
        groups = dict(groups or {})
        if groups and n_types == 0:
            raise ValueError(f"Specialist `groups` {sorted(groups)} need cell types, but `n_types` is 0.")
        clean_groups: dict[str, tuple[int, ...]] = {}
        for name, members in groups.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Group names must be non-empty strings without '.'; got {name!r}.")
            members = tuple(int(m) for m in members)
            bad = [m for m in members if not 0 <= m < n_types]
            if not members or bad:
                raise ValueError(f"Group {name!r} must list cell type indices in [0, {n_types}); got {list(members)}.")
            clean_groups[name] = members
        if reference is not None:
            reference = torch.as_tensor(reference, dtype=torch.float32).detach().clone()
            if reference.ndim != 2 or reference.shape[1] != n_genes or reference.shape[0] < 1:
                raise ValueError(
                    f"`reference` must be (n_profiles, n_genes={n_genes}); got shape {tuple(reference.shape)}."
                )
            if not reference.is_meta and not torch.isfinite(reference).all():
                raise ValueError("`reference` contains NaN or infinite values.")

        self.n_genes, self.n_types = int(n_genes), int(n_types)
        self.groups = clean_groups
        self.embed_dim = embed_dim
        self.register_buffer("reference", reference)
        n_profiles = None if reference is None else int(reference.shape[0])

        self.backbone = UNet3Plus(
            3, n_types + 1 if n_types else 2, width=width, upsample_first=upsample_first, encoder=encoder
        )
        pooled = self.backbone.decoder_channels + self.backbone.encoder_channels[0]
        self.feature_encoder = feature_encoder
        extra = 0 if feature_encoder is None else int(feature_encoder.out_features)
        self.morphometrics = spec.morphometrics
        if self.morphometrics:
            extra += self.backbone.encoder_channels[0] + 1
        self.embed = _mlp(2 * pooled + extra, 2 * hidden, embed_dim, dropout)
        if n_types:
            self.type_head: nn.Module | None = _mlp(embed_dim, hidden, n_types, dropout)
            self.composition_head: nn.Module | None = _mlp(embed_dim, hidden, n_types, dropout)
            self.expr_type_head: ExpressionTypeHead | None = ExpressionTypeHead(
                n_genes, n_types, hidden=hidden, dropout=dropout
            )
        else:
            self.type_head = self.composition_head = self.expr_type_head = None
        query_dim = n_types if n_types else embed_dim
        head_kwargs = {
            "n_profiles": n_profiles,
            "hidden": hidden,
            "n_tokens": n_tokens,
            "token_dim": embed_dim,
            "n_heads": n_heads,
            "dropout": dropout,
            "activation": spec.output_activation,
            "cell_offset": spec.cell_offset,
        }
        self.expr_head = ExpressionHead(embed_dim, n_genes, query_dim, **head_kwargs)
        self.group_heads = nn.ModuleDict(
            {name: ExpressionHead(embed_dim, n_genes, query_dim, **head_kwargs) for name in clean_groups}
        )
        # Built last: every other weight is initialised as without context, and the context starts as the identity.
        self.context: NeighbourContext | None = (
            NeighbourContext(embed_dim, spec.context_neighbours, hidden=hidden, dropout=dropout)
            if spec.context_neighbours
            else None
        )
        # Fitted in closed form after training (`_readout.fit_readout`); buffers only, no random initialisation.
        self.readout: ResidualReadout | None = ResidualReadout(embed_dim, n_genes) if spec.readout else None

    def set_readout(self, readout: ResidualReadout | None) -> None:
        """Hold ``readout`` (fitted after training), recorded in :attr:`spec` so that it is saved and rebuilt."""
        self.readout = readout
        self.spec = self.spec.replace(readout=readout is not None)

    # ------------------------------------------------------------------ pieces
    def pool_cells(
        self, maps: Sequence[torch.Tensor], labels: torch.Tensor, n_cells: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-nucleus means of ``maps`` and visible areas; see :func:`segment_pool` (overridable for benchmarks)."""
        return segment_pool(maps, labels, n_cells)

    def expr_to_type(self, expr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expression-to-type head: ``(hidden features, logits)`` for ``(n, G)`` expression on the target scale."""
        if self.expr_type_head is None:
            raise RuntimeError("This network has no cell types (`n_types == 0`), hence no expression-to-type head.")
        return self.expr_type_head(expr)

    def fuse_for_inference(self, *, inplace: bool = False, channels_last: bool = False) -> GHISTNetwork:
        """Return the network in eval mode with every batch norm folded into its convolution.

        Outputs are unchanged up to float rounding; the fused network cannot be trained any more (hence a copy
        by default). ``channels_last=True`` also converts the weights to the channels-last memory format, which
        is faster with oneDNN on CPU (the input image then best comes channels-last too).
        """
        net = self if inplace else copy.deepcopy(self)
        net = fuse_conv_bn_(net.eval())
        return net.to(memory_format=torch.channels_last) if channels_last else net

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        image: torch.Tensor,
        labels: torch.Tensor,
        cell_batch: torch.Tensor,
        n_cells: int | torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor] | None]:
        """Run the network on a batch of tiles.

        Parameters
        ----------
        image
            ``(B, 3, T, T)`` standardised H&E tiles (channels_last welcome).
        labels
            ``(B, T, T)`` int64 nucleus ids: 0 background, ``1..N`` batch-unique cells, ``-1`` ignored.
        cell_batch
            ``(N,)`` int64 tile index of each cell.
        n_cells
            ``N`` (defaults to ``len(cell_batch)``).

        Returns
        -------
        A dict with

        ``pixel_logits``
            ``(B, n_types + 1, T, T)`` (``(B, 2, T, T)`` without types), class 0 = background.
        ``embedding``
            ``(N, embed_dim)`` cell embeddings (after the neighbourhood context, if any).
        ``cell_area``
            ``(N,)`` int64 visible nucleus pixels of each cell in its tile.
        ``cell_logits``
            ``(N, n_types)`` cell-type logits, or ``None`` without types.
        ``composition_logits``, ``composition``
            ``(B, n_types)`` estimated tile composition (logits, softmax), or ``None`` without types.
        ``expr_init``, ``expr``
            ``(N, G)`` first and refined expression estimates (target scale).
        ``profile_weights``
            ``(N, R)`` mixture weights over the reference profiles, or ``None`` without a reference.
        ``group_expr``
            ``{group name: (N, G)}`` specialist predictions for every cell (empty without groups).

        """
        n_cells = int(cell_batch.numel() if n_cells is None else n_cells)
        if cell_batch.numel() != n_cells:
            raise ValueError(f"`cell_batch` has {cell_batch.numel()} entries for `n_cells`={n_cells}.")
        if labels.shape != (image.shape[0], *image.shape[-2:]):
            raise ValueError(f"`labels` shape {tuple(labels.shape)} does not match `image` {tuple(image.shape)}.")
        n_tiles = image.shape[0]
        pixel_logits, decoded, encoded = self.backbone(image)
        maps = (decoded, encoded)
        cell_means, area = self.pool_cells(maps, labels, n_cells)
        tile_means = torch.cat([m.mean(dim=(2, 3), dtype=torch.float32) for m in maps], dim=1)
        parts = [cell_means, tile_means[cell_batch]]
        if self.feature_encoder is not None:
            parts.append(self.feature_encoder(image, labels, cell_batch, n_cells).to(cell_means.dtype))
        if self.morphometrics:
            parts.append(nucleus_morphometrics(encoded, labels, n_cells, cell_means, area).to(cell_means.dtype))
        embedding = self.embed(torch.cat(parts, dim=1))
        if self.context is not None:
            centroids, visible = cell_centroids(labels, n_cells)
            embedding = self.context(embedding, centroids, visible, cell_batch)
        tile_embedding, _ = _segment_mean(embedding.float(), cell_batch, n_tiles)

        cell_logits = composition_logits = composition = None
        if self.n_types:
            cell_logits = self.type_head(embedding)
            composition_logits = self.composition_head(tile_embedding)
            composition = torch.softmax(composition_logits.float(), dim=-1)
            query = composition[cell_batch]
        else:
            query = tile_embedding[cell_batch]
        expr, expr_init, weights = self.expr_head(embedding, query, self.reference)
        if self.readout is not None:
            expr = (expr + self.readout(embedding).to(expr.dtype)).clamp(min=0)
        group_expr = {name: head(embedding, query, self.reference)[0] for name, head in self.group_heads.items()}
        return {
            "pixel_logits": pixel_logits,
            "embedding": embedding,
            "cell_area": area,
            "cell_logits": cell_logits,
            "composition_logits": composition_logits,
            "composition": composition,
            "expr_init": expr_init,
            "expr": expr,
            "profile_weights": weights,
            "group_expr": group_expr,
        }


# ---------------------------------------------------------------------- inference helpers
def dihedral_view(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """One of the 8 flips and 90° rotations of the last two axes.

    Mirrored left-right if ``flip``, then turned ``k`` quarter turns; the same view of an image and of its labels
    keeps them aligned.
    """
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def neighbourhood_refine(
    cell_probs: torch.Tensor,
    composition: torch.Tensor,
    cell_batch: torch.Tensor,
    *,
    alpha: float = 2.0,
    types: Sequence[int] | torch.Tensor | None = None,
    confidence: float = 0.6,
    factor: float = 0.003,
    steps: int = 30,
    generator: torch.Generator | None = None,
    jitter: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nudge uncertain cells' types so each tile's predicted composition moves toward the estimated one.

    ``docs/method.md``, "Neighbourhood refinement". For every tile ``b`` with ``n_b`` cells, the gap
    ``delta[b, t] = composition[b, t] * n_b - #{cells of b predicted as t}`` is computed for all tiles at once
    (one ``bincount`` over ``tile * T + type``). Each cell whose top probability is at most ``confidence`` and
    whose predicted type is in ``types`` gets ``alpha * delta[b, t] * u`` added to its score for each type ``t``
    in ``types``, with a small random positive factor ``u = factor / 2 * (1 + jitter * (r - 1/2))``,
    ``r ~ Uniform(0, 1)`` drawn per cell and type, and takes the best of ``types``. The random part only breaks
    ties: the paper's ``Uniform(0, factor)`` (same mean) let the seed decide most types of a weak model, whose
    cells are all uncertain (``docs/benchmarks.md``); with ``jitter=1e-3`` the seed hardly matters.
    This is repeated ``steps`` times with the gap recomputed from the updated types (``steps=1`` is a single
    nudge): the nudges shrink as the gap closes, so the composition approaches the
    estimate instead of overshooting it, which a single large nudge does when many cells are uncertain. The
    scores are finally clipped at 0 and renormalised. Confident cells and cells of other types are unchanged.

    Parameters
    ----------
    cell_probs
        ``(N, T)`` cell-type probabilities.
    composition
        ``(B, T)`` estimated tile compositions (rows sum to 1).
    cell_batch
        ``(N,)`` tile index of each cell.
    alpha
        Strength; ``0`` returns the input unchanged.
    types
        Indices of the types taking part (default all): only cells predicted as one of them move, and only
        into one of them.
    confidence
        Cells whose top probability exceeds this are left alone.
    factor
        Twice the mean of the positive factor multiplying each nudge.
    steps
        Number of nudges. The defaults (``factor=0.003``, ``steps=30``) brought the composition closer to the
        estimate in every tile of simulations with 10-200 cells per tile and 9 types, at any confidence level.
    generator
        Random generator for reproducible factors, on any device (the factors are drawn on its device and
        moved to ``cell_probs``').
    jitter
        Relative spread of the factor around its mean (ties between equally nudged types are broken at random).

    Returns
    -------
    ``(probs, types)``: refined ``(N, T)`` probabilities and ``(N,)`` int64 predicted types.

    Examples
    --------
    >>> probs = torch.tensor([[0.55, 0.45], [0.52, 0.48], [0.9, 0.1]])
    >>> comp = torch.tensor([[1 / 3, 2 / 3]])
    >>> g = torch.Generator().manual_seed(0)
    >>> neighbourhood_refine(probs, comp, torch.zeros(3, dtype=torch.long), generator=g)[1]
    tensor([1, 1, 0])

    """
    if cell_probs.ndim != 2 or composition.ndim != 2 or cell_probs.shape[1] != composition.shape[1]:
        raise ValueError(
            f"`cell_probs` (N, T) and `composition` (B, T) must share T; got {tuple(cell_probs.shape)} and "
            f"{tuple(composition.shape)}."
        )
    if steps < 1:
        raise ValueError(f"`steps` must be at least 1; got {steps}.")
    n, n_types = cell_probs.shape
    n_tiles = composition.shape[0]
    pred = cell_probs.argmax(dim=1) if n else cell_probs.new_zeros(0, dtype=torch.long)
    if alpha == 0 or n == 0:
        return cell_probs, pred
    device, dtype = cell_probs.device, cell_probs.dtype
    allowed = torch.zeros(n_types, dtype=torch.bool, device=device)
    if types is None:
        allowed[:] = True
    else:
        allowed[torch.as_tensor(types, dtype=torch.long, device=device)] = True
    eligible = (cell_probs.max(dim=1).values <= confidence) & allowed[pred]
    n_per_tile = torch.bincount(cell_batch, minlength=n_tiles).to(dtype).unsqueeze(1)
    target = composition.to(dtype) * n_per_tile
    column_mask = allowed.to(dtype)
    scores, current = cell_probs, pred
    for _ in range(steps):
        counts = torch.bincount(cell_batch * n_types + current, minlength=n_tiles * n_types)
        delta = target - counts.reshape(n_tiles, n_types).to(dtype)
        # Drawn where the generator lives (a CPU generator serves a GPU run, with the same draws as on the CPU).
        draw_on = generator.device if generator is not None else device
        r = torch.rand(n, n_types, generator=generator, device=draw_on, dtype=dtype).to(device)
        u = 0.5 * factor * (1 + jitter * (r - 0.5))
        nudged = (scores + alpha * delta[cell_batch] * u * column_mask).clamp(min=0)
        scores = torch.where(eligible.unsqueeze(1), nudged, scores)
        current = torch.where(eligible, scores.masked_fill(~allowed, -1.0).argmax(dim=1), pred)
    scores = scores / scores.sum(dim=1, keepdim=True).clamp(min=torch.finfo(dtype).tiny)
    return torch.where(eligible.unsqueeze(1), scores, cell_probs), current


def specialist_expression(
    expr: torch.Tensor,
    group_expr: Mapping[str, torch.Tensor],
    old_types: torch.Tensor,
    new_types: torch.Tensor,
    groups: Mapping[str, Sequence[int]],
) -> torch.Tensor:
    """Give cells that refinement moved into a specialist group that group's expression (``docs/method.md``).

    A cell takes ``group_expr[name]`` when its new type is in group ``name`` and its old type was not; other
    cells keep ``expr``. Returns a new tensor.
    """
    out = expr.clone()
    for name, members in groups.items():
        members_t = torch.as_tensor(list(members), dtype=torch.long, device=expr.device)
        moved = torch.isin(new_types, members_t) & ~torch.isin(old_types, members_t)
        out[moved] = group_expr[name][moved].to(out.dtype)
    return out
