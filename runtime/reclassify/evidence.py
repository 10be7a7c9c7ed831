"""The evidence behind a re-label: proposals from the burst, the embedding and SpeciesNet's top-5, and features.

For each query (a coarse candidate, or a held-out degraded view during calibration) and each level, three
sources each propose one taxon: the burst (the label most of the event's stage-1 references agree on), the
embedding (the nearest geofence-allowed descendant centroid) and SpeciesNet itself (the descendant with
the most top-5 mass). Every proposal is then described by the same features, whichever source made it, so
one calibrated model can weigh agreement between sources. All of it is vectorised over queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..speciesnet.ensemble import Classification
from ..speciesnet.ensemble.taxonomy import get_ancestor_at_level
from .stages import Centroids, StageConfig, _lineage, label_depth, unit_rows

__all__ = ["FEATURES", "CardModel", "Queries", "QueryEvidence", "Vocabulary"]

DEPTH_LEVEL = {5: "species", 4: "genus", 3: "family", 2: "order", 1: "class"}
FEATURES = ("burst_votes_log", "burst_share", "burst_best_score", "distance", "margin", "has_centroid",
            "distance_z", "speciesnet_mass", "nearest", "log2_side_px", "brightness", "colourfulness",
            "bird_prompt", "burst_top", "speciesnet_top", "agreement", "class", "order", "family", "genus",
            "species")
_TOP = 5


class Vocabulary:
    """Integer ids for every taxon pass 2 meets, and each one's ancestor id per depth."""

    def __init__(self, taxonomy_map: dict) -> None:
        self.taxonomy_map = taxonomy_map
        self.ids: dict[str, int] = {}
        self.names: list[str] = []
        self._anc: list[list[int]] = []
        self._tables: dict[int, np.ndarray] = {}
        self._columns: dict[tuple[str, int], np.ndarray] = {}

    def id(self, label: str) -> int:
        """Id of a label (added, with its ancestors, when new)."""
        found = self.ids.get(label)
        if found is not None:
            return found
        found = self.ids[label] = len(self.names)
        self.names.append(label)
        self._anc.append([-1] * 6)
        own = label_depth(label)
        for depth in range(1, 6):
            if own == depth:
                self._anc[found][depth] = found
            elif own > depth:
                node = get_ancestor_at_level(label, DEPTH_LEVEL[depth], self.taxonomy_map)
                self._anc[found][depth] = self.id(node) if node else -1
        return found

    def ids_of(self, labels: Sequence[str]) -> np.ndarray:
        """Ids of many labels ("" gives -1)."""
        return np.array([self.id(lab) if lab else -1 for lab in labels], dtype=np.int64)

    def ancestors(self, depth: int) -> np.ndarray:
        """Ancestor id at a depth per id (the id itself at its own depth, -1 when none), with a -1 slot last."""
        cached = self._tables.get(depth)
        if cached is None or len(cached) != len(self._anc) + 1:
            cached = self._tables[depth] = np.array([row[depth] for row in self._anc] + [-1], dtype=np.int64)
        return cached

    def descendant_mask(self, coarse: str, allowed: np.ndarray) -> np.ndarray:
        """Bool per id: strictly below `coarse` (blank and animal are the root) and `allowed` (per id)."""
        depth = 0 if coarse == Classification.BLANK else label_depth(coarse)
        if depth < 0:
            return np.zeros(len(self.names), dtype=bool)
        mask = (self._column("depth", depth) > depth) & allowed[:len(self.names)]
        if depth > 0:
            mask &= self._column("prefix", depth) == ";".join(coarse.split(";")[1:1 + depth])
        return mask

    def _column(self, kind: str, depth: int) -> np.ndarray:
        """Per id, its depth or its first `depth` ranks joined; cached and extended as ids are added."""
        key = (kind, depth)
        have = self._columns.get(key)
        if have is None or len(have) < len(self.names):
            start = 0 if have is None else len(have)
            new = [label_depth(n) if kind == "depth" else ";".join(n.split(";")[1:1 + depth])
                   for n in self.names[start:]]
            new = np.array(new, dtype=np.int64 if kind == "depth" else object)
            have = new if have is None else np.concatenate([have, new])
            self._columns[key] = have
        return have


class CardModel:
    """What the card knows once: centroids (with member sums for leave-out) and its stage-1 references."""

    def __init__(self, vocab: Vocabulary, cents: Centroids, cent_vectors: np.ndarray, cent_labels: list[str],
                 member_of_ref: np.ndarray, ref_labels: list[str], ref_scores: np.ndarray,
                 ref_events: list[str], allowed: Callable[[str], bool], config: StageConfig,
                 ref_tops: Optional[Sequence[tuple[list[str], list[float]]]] = None) -> None:
        self.vocab, self.cents, self.config, self.allowed = vocab, cents, config, allowed
        for label in cents.labels:
            vocab.id(label)
        members = np.asarray(cent_vectors)  # already unit length (pass_two normalises before centroids)
        dim = cents.vectors.shape[1] if len(cents) else (members.shape[1] if members.ndim == 2 else 0)
        self.sums = np.zeros((len(cents), dim))
        self.sizes = np.zeros(len(cents))
        self.label_sums: dict[str, np.ndarray] = {}
        self.label_sizes: dict[str, int] = {}
        if len(cent_labels):
            names, inverse = np.unique(np.asarray(cent_labels, dtype=object), return_inverse=True)
            order = np.argsort(inverse, kind="stable")
            _, starts = np.unique(inverse[order], return_index=True)
            totals = np.add.reduceat(members[order].astype(np.float64), starts, axis=0)
            sizes = np.bincount(inverse, minlength=len(names))
            for label, total, size in zip(names.tolist(), totals, sizes.tolist()):
                vocab.id(label)
                self.label_sums[label] = total
                self.label_sizes[label] = size
                for _, node in _lineage(label, vocab.taxonomy_map):
                    k = cents.index.get(node)
                    if k is not None:
                        self.sums[k] += total
                        self.sizes[k] += size
        member_of_ref = np.asarray(member_of_ref, dtype=np.int64)
        self.ref_in_centroids = member_of_ref >= 0
        self.ref_member = np.zeros((member_of_ref.size, dim))
        self.ref_member[self.ref_in_centroids] = members[member_of_ref[self.ref_in_centroids]]
        self.spread = np.maximum(cents.std_distance, 0.01) if len(cents) else np.zeros(0)
        self.ref_ids = vocab.ids_of(ref_labels)
        self.ref_scores = np.asarray(ref_scores, dtype=np.float64)
        self.event_ids: dict[str, int] = {}
        self.ref_events = np.array([self.event_id(e) for e in ref_events], dtype=np.int64)
        self.ref_labels, self.ref_tops = ref_labels, ref_tops
        self._groups: Optional[dict[tuple[int, int], list[int]]] = None
        self._impostors: dict[int, int] = {}
        self._group_cache: dict[tuple[int, int], tuple[int, list[int]]] = {}
        self.cols: dict[int, np.ndarray] = {}
        for depth, level in DEPTH_LEVEL.items():
            self.cols[depth] = np.array([k for k, lev in enumerate(cents.levels) if lev == level], dtype=np.int64)
        self.cent_ids = vocab.ids_of(cents.labels)
        self._masks: dict[str, np.ndarray] = {}
        self._allowed = np.zeros(0, dtype=bool)

    def descendants(self, coarse: str) -> np.ndarray:
        """Cached `Vocabulary.descendant_mask` for a coarse label, extended as the vocabulary grows."""
        mask = self._masks.get(coarse)
        if mask is None or len(mask) != len(self.vocab.names):
            names = self.vocab.names
            if len(self._allowed) < len(names):
                self._allowed = np.concatenate([self._allowed, np.array(
                    [self.allowed(n) for n in names[len(self._allowed):]], dtype=bool)])
            mask = self._masks[coarse] = self.vocab.descendant_mask(coarse, self._allowed)
        return mask

    def group(self, event: int, label: int) -> tuple[int, list[int]]:
        """(references of this label in this event, their impostor labels), built on first use."""
        if self._groups is None:
            self._groups = {}
            for j, key in enumerate(zip(self.ref_events.tolist(), self.ref_ids.tolist())):
                self._groups.setdefault(key, []).append(j)
        key = (event, label)
        found = self._group_cache.get(key)
        if found is None:
            members = self._groups.get(key, [])
            found = self._group_cache[key] = (len(members),
                                              [m for m in (self._impostor(j) for j in members) if m >= 0])
        return found

    def _impostor(self, j: int) -> int:
        """What reference j would have been called had its species been unknown to the classifier (-1: no
        reference): its top-5 without its own label, renormalised (a softmax over the other classes), accepted
        as stage 1 would accept it. An unknown animal's burst holds such confidently wrong references."""
        found = self._impostors.get(j)
        if found is None:
            found = -1
            if self.ref_tops is not None:
                classes, scores = self.ref_tops[j]
                own_label = self.ref_labels[j]
                rest = [(sc, c) for c, sc in zip(classes, scores) if c and c != own_label]
                own = sum(sc for c, sc in zip(classes, scores) if c == own_label)
                if rest and own < 1.0:
                    top_score, top_label = max(rest)
                    if label_depth(top_label) == 5 and top_score / (1.0 - own) >= self.config.tau_accept:
                        found = self.vocab.id(top_label)
            self._impostors[j] = found
        return found

    def event_id(self, event: Optional[str]) -> int:
        """Integer id of an event (-1 for none)."""
        if event is None:
            return -1
        return self.event_ids.setdefault(event, len(self.event_ids))


@dataclass
class Queries:
    """Rows to score: coarse candidates or calibration views, with everything their features need."""

    vectors: np.ndarray
    coarse: list[str]
    events: list[Optional[str]]
    top_classes: list[list[str]]
    top_scores: list[list[float]]
    quality: np.ndarray
    bird_prompt: np.ndarray
    source_ref: np.ndarray  # the card reference this view was rendered from (-1: none)
    hidden_label: list[Optional[str]]  # species held out as if unknown (None: none)

    def take(self, rows: np.ndarray) -> Queries:
        """The subset of rows (for chunking)."""
        return Queries(self.vectors[rows], [self.coarse[i] for i in rows], [self.events[i] for i in rows],
                       [self.top_classes[i] for i in rows], [self.top_scores[i] for i in rows], self.quality[rows],
                       self.bird_prompt[rows], self.source_ref[rows], [self.hidden_label[i] for i in rows])


class QueryEvidence:
    """Proposals and features for a set of queries against one card model, vectorised over queries."""

    def __init__(self, card: CardModel, q: Queries) -> None:
        self.card, self.q = card, q
        vocab = card.vocab
        n = len(q.coarse)
        self.top_ids = np.full((n, _TOP), -1, dtype=np.int64)
        self.top_scores = np.zeros((n, _TOP))
        ids = vocab.ids
        for k in range(_TOP):
            labels_k = [c[k] if len(c) > k else "" for c in q.top_classes]
            self.top_ids[:, k] = [ids[lab] if lab in ids else (vocab.id(lab) if lab else -1) for lab in labels_k]
            self.top_scores[:, k] = [sc[k] if len(sc) > k else 0.0 for sc in q.top_scores]
        self.hidden_ids = np.array([vocab.id(h) if h else -1 for h in q.hidden_label], dtype=np.int64)
        hidden_rows = np.flatnonzero(self.hidden_ids >= 0)
        if hidden_rows.size:
            own = self.top_ids[hidden_rows] == self.hidden_ids[hidden_rows, None]
            left = 1.0 - (self.top_scores[hidden_rows] * own).sum(axis=1, keepdims=True)
            self.top_scores[hidden_rows] = np.where(own, 0.0, self.top_scores[hidden_rows] / np.maximum(left, 1e-6))
            self.top_ids[hidden_rows] = np.where(own, -1, self.top_ids[hidden_rows])
        coarse_names = sorted(set(q.coarse))
        index = {c: i for i, c in enumerate(coarse_names)}
        self.coarse_row = np.array([index[c] for c in q.coarse], dtype=np.int64)
        self.coarse_depth = np.array([0 if c == Classification.BLANK else label_depth(c) for c in q.coarse])
        self.permitted = np.stack([card.descendants(c) for c in coarse_names]) \
            if coarse_names else np.zeros((0, len(vocab.names)), dtype=bool)
        self.permitted = np.hstack([self.permitted, np.zeros((len(coarse_names), 1), dtype=bool)])  # id -1
        self.events = np.array([card.event_ids.get(e, -2) if e is not None else -1 for e in q.events],
                               dtype=np.int64)
        self.is_aves = np.array([label_depth(nm) >= 1 and nm.split(";")[1] == "aves" for nm in vocab.names]
                                + [False], dtype=bool)
        self._burst: dict[int, tuple] = {}
        self._dist: dict = {}

    def _allowed(self, ids: np.ndarray) -> np.ndarray:
        known = (ids >= 0) & (ids < self.permitted.shape[1] - 1)  # ids added after this query set: not allowed
        return self.permitted[self.coarse_row, np.where(known, ids, -1)] & known

    # SpeciesNet's own evidence
    def speciesnet(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(anc ids n x 5, mass of each column's taxon) of the top-5 at a depth."""
        anc = self.card.vocab.ancestors(depth)[self.top_ids]
        same = anc[:, :, None] == anc[:, None, :]
        mass = (same * self.top_scores[:, None, :]).sum(axis=2)
        return anc, np.where(anc >= 0, mass, 0.0)

    def speciesnet_proposal(self, depth: int) -> np.ndarray:
        """The allowed descendant with the most top-5 mass (-1: none)."""
        anc, mass = self.speciesnet(depth)
        ok = self.permitted[self.coarse_row[:, None], anc] & (anc >= 0)
        mass = np.where(ok, mass, -1.0)
        best = np.argmax(mass, axis=1)
        rows = np.arange(len(best))
        return np.where(mass[rows, best] > 0, anc[rows, best], -1)

    def mass(self, depth: int, proposal: np.ndarray) -> np.ndarray:
        """SpeciesNet's top-5 score summed over the proposal's subtree."""
        anc = self.card.vocab.ancestors(depth)[self.top_ids]
        hit = (anc == proposal[:, None]) & (proposal[:, None] >= 0)
        return (hit * self.top_scores).sum(axis=1)

    # the burst
    def _tally(self, depth: int):
        """Sorted (event, taxon) keys of the card's references with their counts and best scores."""
        if depth not in self._burst:
            card = self.card
            width = len(card.vocab.names) + 1
            anc = card.vocab.ancestors(depth)[card.ref_ids] if len(card.ref_ids) else np.zeros(0, dtype=np.int64)
            keep = (anc >= 0) & (card.ref_events >= 0)
            keys = card.ref_events[keep] * width + anc[keep]
            uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            best = np.zeros(len(uniq))
            np.maximum.at(best, inverse, card.ref_scores[keep])
            totals = np.bincount(card.ref_events[card.ref_events >= 0], minlength=len(card.event_ids))
            self._burst[depth] = (width, uniq, counts, best, totals, anc)
        return self._burst[depth]

    def _lookup(self, depth: int, proposal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        width, uniq, counts, best, _, _ = self._tally(depth)
        keys = self.events * width + proposal
        pos = np.clip(np.searchsorted(uniq, keys), 0, max(len(uniq) - 1, 0))
        hit = (self.events >= 0) & (proposal >= 0) & (len(uniq) > 0)
        if len(uniq):
            hit &= uniq[pos] == keys
        return np.where(hit, counts[pos] if len(uniq) else 0, 0).astype(float), \
            np.where(hit, best[pos] if len(uniq) else 0, 0.0)

    def _left_out(self, depth: int, proposal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Votes for the proposal and event size that leave-out removes (negative: impostors add).

        A view loses its own reference; a hidden-species view loses every reference of its species in the
        event and gains those references' impostor labels (what they would have been called as unknowns).
        """
        card = self.card
        anc_table = card.vocab.ancestors(depth)
        votes = np.zeros(len(proposal))
        size = np.zeros(len(proposal))
        src = self.q.source_ref
        has_src = src >= 0
        hidden = self.hidden_ids >= 0
        plain = has_src & ~hidden
        if plain.any():
            own = anc_table[card.ref_ids[src[plain]]]
            votes[plain] = (own == proposal[plain]).astype(float)
            size[plain] = 1.0
        if hidden.any():
            rows, n_hidden, imp_rows, imp_ids = self._hidden_burst()
            votes[rows] = np.where(anc_table[self.hidden_ids[rows]] == proposal[rows], n_hidden, 0)
            imp_anc = anc_table[imp_ids]
            match = (imp_anc == proposal[imp_rows]) & (proposal[imp_rows] >= 0)
            np.subtract.at(votes, imp_rows[match], 1.0)
            size[rows] = n_hidden
            np.subtract.at(size, imp_rows, 1.0)
        return votes, size

    def _hidden_burst(self):
        """Per hidden row: its species' references in its event, and their impostor labels (row, id pairs)."""
        if "hidden" not in self._dist:
            card = self.card
            rows = np.flatnonzero(self.hidden_ids >= 0)
            n_hidden = np.zeros(rows.size)
            imp_rows, imp_ids = [], []
            for k, i in enumerate(rows.tolist()):
                n_hidden[k], impostors = card.group(int(self.events[i]), int(self.hidden_ids[i]))
                imp_rows += [i] * len(impostors)
                imp_ids += impostors
            self._dist["hidden"] = (rows, n_hidden, np.array(imp_rows, dtype=np.int64),
                                    np.array(imp_ids, dtype=np.int64))
        return self._dist["hidden"]

    def burst(self, depth: int, proposal: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Votes for the proposal among the event's references (leave-out applied), their share, best score."""
        votes, best = self._lookup(depth, proposal)
        totals = self._tally(depth)[4]
        size = np.where(self.events >= 0, totals[np.maximum(self.events, 0)] if len(totals) else 0, 0).astype(float)
        out_votes, out_size = self._left_out(depth, proposal)
        votes = np.maximum(votes - out_votes, 0)
        size = np.maximum(size - out_size, 0)
        votes = np.minimum(votes, size)
        best = np.where(votes > 0, best, 0.0)
        return votes, votes / np.maximum(size, 1), best

    def burst_proposal(self, depth: int) -> np.ndarray:
        """The allowed taxon most of the event's references agree on, among its two most voted (-1: none)."""
        width, uniq, counts, best, _, _ = self._tally(depth)
        out = np.full(len(self.events), -1, dtype=np.int64)
        if not len(uniq):
            return out  # no references anywhere on the card: no impostors either
        event_of = uniq // width
        order = np.lexsort((-best, -counts, event_of))
        first = np.full(len(self.card.event_ids) + 1, -1, dtype=np.int64)
        second = np.full(len(self.card.event_ids) + 1, -1, dtype=np.int64)
        seen = np.r_[True, event_of[order][1:] != event_of[order][:-1]]
        first[event_of[order][seen]] = uniq[order][seen] % width
        rest = order[~seen]
        seen2 = np.r_[True, event_of[rest][1:] != event_of[rest][:-1]] if len(rest) else np.zeros(0, dtype=bool)
        second[event_of[rest][seen2]] = uniq[rest][seen2] % width
        ev = np.where(self.events >= 0, self.events, len(self.card.event_ids))
        best_votes = np.zeros(len(out))
        impostor = np.full(len(out), -1, dtype=np.int64)
        anc_table = self.card.vocab.ancestors(depth)
        for i in np.flatnonzero(self.hidden_ids >= 0):
            _, impostors = self.card.group(int(self.events[i]), int(self.hidden_ids[i]))
            found = [int(anc_table[m]) for m in impostors if anc_table[m] >= 0]
            if found:
                impostor[i] = max(set(found), key=found.count)
        for cand in (first[ev], second[ev], impostor):
            cand = np.where(self._allowed(np.maximum(cand, -1)) & (cand >= 0), cand, -1)
            votes, _, _ = self.burst(depth, cand)
            better = (votes > best_votes) & (cand >= 0)
            out[better], best_votes[better] = cand[better], votes[better]
        return out

    # the embedding
    def distances(self, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """(query x centroid-at-depth) cosine distances, leave-out applied, disallowed ones at inf; centroid ids."""
        if depth in self._dist:
            return self._dist[depth]
        card = self.card
        cols = card.cols[depth]
        n = len(self.events)
        if cols.size == 0 or n == 0:
            self._dist[depth] = (np.full((n, 0), np.inf), np.zeros(0, dtype=np.int64))
            return self._dist[depth]
        x = unit_rows(np.asarray(self.q.vectors, dtype=np.float32))
        d = 1.0 - x @ card.cents.vectors[cols].T.astype(np.float32)
        col_of = np.full(len(card.cents), -1, dtype=np.int64)
        col_of[cols] = np.arange(cols.size)
        anc_table = card.vocab.ancestors(depth)
        cent_of_id = np.full(len(card.vocab.names) + 1, -1, dtype=np.int64)
        cent_of_id[card.cent_ids] = np.arange(len(card.cents))
        src = self.q.source_ref
        rows = np.flatnonzero(src >= 0)
        if rows.size:
            hid = self.hidden_ids[rows]
            hidden = np.array([self.q.hidden_label[i] in card.label_sums if self.q.hidden_label[i] else False
                               for i in rows], dtype=bool)
            own = card.ref_in_centroids[src[rows]] & ~hidden
            taxon = np.where(hidden, hid, card.ref_ids[src[rows]])
            k = cent_of_id[anc_table[taxon]]
            dim = card.sums.shape[1]
            vec = np.zeros((rows.size, dim))
            size = np.zeros(rows.size)
            vec[own] = card.ref_member[src[rows][own]]
            size[own] = 1.0
            for j in np.flatnonzero(hidden):
                vec[j] = card.label_sums[self.q.hidden_label[rows[j]]]
                size[j] = card.label_sizes[self.q.hidden_label[rows[j]]]
            live = (own | hidden) & (k >= 0)
            live[live] &= col_of[k[live]] >= 0
            r, kk = rows[live], k[live]
            left = card.sizes[kk] - size[live]
            c = card.sums[kk] - vec[live]
            c = unit_rows(c)
            patched = 1.0 - np.einsum("ij,ij->i", x[r].astype(np.float64), c)
            d[r, col_of[kk]] = np.where(left < card.config.n_min, np.inf, patched)
        ids = card.cent_ids[cols]
        d[~self.permitted[:, ids][self.coarse_row]] = np.inf
        self._dist[depth] = (d, cols)
        return self._dist[depth]

    def embedding_proposal(self, depth: int) -> np.ndarray:
        """The nearest allowed descendant centroid at a depth (-1: none)."""
        d, cols = self.distances(depth)
        out = np.full(d.shape[0], -1, dtype=np.int64)
        if d.shape[1]:
            best = np.argmin(d, axis=1)
            finite = np.isfinite(d[np.arange(len(best)), best])
            out[finite] = self.card.cent_ids[cols][best[finite]]
        return out

    def embedding(self, depth: int, proposal: np.ndarray):
        """Distance to the proposal's centroid, margin over the nearest other, has-centroid, z, is-nearest."""
        d, cols = self.distances(depth)
        n = len(proposal)
        dist, margin, has, z, nearest = np.ones(n), np.full(n, -1.0), np.zeros(n), np.full(n, 20.0), np.zeros(n)
        if not d.shape[1]:
            return dist, margin, has, z, nearest
        pos_of_id = np.full(len(self.card.vocab.names) + 1, -1, dtype=np.int64)
        pos_of_id[self.card.cent_ids[cols]] = np.arange(cols.size)
        pos = pos_of_id[proposal]
        rows = np.flatnonzero(pos >= 0)
        own = np.full(n, np.inf)
        own[rows] = d[rows, pos[rows]]
        rows = rows[np.isfinite(own[rows])]
        best = np.argmin(d, axis=1)
        first = d[np.arange(n), best]
        masked = d.copy()
        masked[np.arange(n), best] = np.inf
        runner = masked.min(axis=1)
        other = np.where(best == pos, runner, first)
        dist[rows] = own[rows]
        has[rows] = 1.0
        margin[rows] = np.minimum(np.where(np.isfinite(other[rows]), other[rows] - own[rows], 1.0), 1.0)
        nearest[rows] = (own[rows] <= other[rows]).astype(float)
        k = cols[pos[rows]]
        z[rows] = (own[rows] - self.card.cents.mean_distance[k]) / self.card.spread[k]
        return dist, margin, has, z, nearest

    def raw_proposals(self, depth: int) -> list[np.ndarray]:
        """The three sources' proposals (burst, embedding, SpeciesNet) at a depth, -1 where a source has none."""
        if ("p", depth) not in self._dist:
            self._dist[("p", depth)] = [self.burst_proposal(depth), self.embedding_proposal(depth),
                                        self.speciesnet_proposal(depth)]
        return self._dist[("p", depth)]

    def proposals(self, depth: int) -> list[np.ndarray]:
        """The three proposals at a depth, later duplicates blanked to -1."""
        found = self.raw_proposals(depth)
        out = []
        for k, p in enumerate(found):
            p = p.copy()
            for earlier in found[:k]:
                p[p == earlier] = -1
            out.append(p)
        return out

    def features(self, depth: int, proposal: np.ndarray) -> np.ndarray:
        """One feature row per query for its proposal at a depth (see FEATURES)."""
        n = len(proposal)
        votes, share, best_score = self.burst(depth, proposal)
        dist, margin, has, z, nearest = self.embedding(depth, proposal)
        mass = self.mass(depth, proposal)
        quality = np.asarray(self.q.quality, dtype=np.float64)
        side = np.where(np.isnan(quality[:, 0]), 64.0, quality[:, 0])
        bright = np.where(np.isnan(quality[:, 1]), 0.5, quality[:, 1])
        colour = np.where(np.isnan(quality[:, 2]), 0.1, quality[:, 2])
        aves = self.is_aves[proposal] & (proposal >= 0)
        burst_top, _, speciesnet_top = (((p == proposal) & (proposal >= 0)).astype(float)
                                        for p in self.raw_proposals(depth))
        onehot = np.zeros((n, 5))
        onehot[:, depth - 1] = 1.0
        return np.column_stack([
            np.log1p(votes), share, best_score, np.minimum(dist, 1.5), np.clip(margin, -1.0, 1.0), has,
            np.clip(z, -5.0, 20.0), mass, nearest, np.log2(np.clip(side, 2.0, 4096.0)), bright, colour,
            self.q.bird_prompt * aves, burst_top, speciesnet_top, burst_top + nearest + speciesnet_top, onehot,
        ])

