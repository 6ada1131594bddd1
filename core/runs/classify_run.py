"""One classification run over collected inputs: its results file (new or resumed, records already there counted
into the metrics), the images still to do, and the running counts a front end shows as progress and reports at the
end. Every batch is on disk before it is counted, so ``safe`` is always what an interrupt leaves in the file."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..classifier import Classifier
from ..io.data import Inputs, Item
from ..io.distributed import Dist
from ..io.records import weights_identity
from ..io.results import ResultsFile, results_file
from ..io.summary import Metrics, append_csv_summary, check_csv, summary_row


@dataclass
class ClassifyRun:
    """A run in progress; iterate it to classify the images still to do, batch by batch."""

    clf: Classifier
    found: Inputs
    run_key: dict
    results: ResultsFile
    todo: list[Item]
    metrics: Metrics
    options: dict                    # seed, temperature, topk, dist: what classify_items takes
    keep_records: int = 0            # keep this run's first records in ``records`` (for a front end to show)
    records: list[dict] = field(default_factory=list)
    new: int = 0                     # records this run made
    unreadable: int = 0              # of them, skipped records
    safe: int = 0                    # records in the results file
    start: float = field(default_factory=time.perf_counter)
    gflops: list[float] = field(default_factory=list)    # executed GFLOPs of each ok record in the file

    def count(self, records) -> None:
        """Add records (new or resumed) to the metrics and the compute total."""
        for rec in records:
            self.metrics.add(rec)
            if rec["status"] == "ok" and isinstance(rec.get("gflops"), dict):
                self.gflops.append(rec["gflops"]["executed"])

    @property
    def gflops_per_image(self) -> float | None:
        """Mean executed GFLOPs per classified image, read from the records (exits and reuse included)."""
        return sum(self.gflops) / len(self.gflops) if self.gflops else None

    def __iter__(self) -> Iterator[list[dict]]:
        for batch in self.clf.classify_items(self.todo, self.found.candidates, run_key=self.run_key, **self.options):
            self.results.write(batch)
            self.count(batch)
            self.new, self.safe = self.new + len(batch), self.safe + len(batch)
            self.unreadable += sum(r["status"] == "skipped" for r in batch)
            self.records += batch[:max(self.keep_records - len(self.records), 0)]
            yield batch

    @property
    def ood_score(self) -> str | None:
        return self.options["ood_score"]

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float | None:
        """Images per second this run (None before any)."""
        return self.new / self.seconds if self.new else None

    @property
    def all_unreadable(self) -> bool:
        """This run classified images and could read none of them."""
        return bool(self.new) and self.unreadable == self.new

    def notes(self) -> list[str]:
        """What a person should know before the run starts: left-out images, stages that keep every candidate, what
        resuming found."""
        out, stages, n = list(self.found.notes), self.clf.profile.stages, len(self.found.candidates)
        if self.found.left_out:
            out.append(f"note: left out {self.found.left_out} labelled images whose class is not a candidate")
        big = [i for i, st in enumerate(stages, 1) if st.keep > n]
        if big:
            out.append(f"warning: profile {self.clf.profile.name} keeps more classes (stage {big[0]}: "
                       f"{stages[big[0] - 1].keep}) than there are candidates ({n}); those stages keep every candidate")
        resumed = self.results.resumed
        if resumed is not None and (self.results.done or resumed.torn):
            out.append(f"resume: {len(self.results.done)} images already done, {len(self.todo)} to go"
                       + (" (cut off a torn last line)" if resumed.torn else ""))
        return out

    def append_summary(self, csv: str | os.PathLike, dataset: str | None = None, subset: str | None = None) -> bool:
        """Add this run's summary row to ``csv``; False (nothing added) when it classified nothing new."""
        if self.new:
            append_csv_summary(csv, summary_row(self.metrics, self.clf.profile, self.run_key, dataset, subset,
                                                self.new, self.seconds))
        return bool(self.new)


@contextmanager
def classify_run(clf: Classifier, found: Inputs, out: str | os.PathLike | None = None, resume: bool = False, *,
                 csv: str | os.PathLike | None = None, seed: int = 0, temperature: float | None = None, topk: int = 5,
                 dist: Dist = Dist(), keep_records: int = 0, labels: str = "auto",
                 ood_score: str | None = None) -> Iterator[ClassifyRun]:
    """Open the run's results file ``out`` (locked for the block; ``resume`` continues it) after checking that a
    summary row can be added to ``csv``, and hand back the run. Its identity (every record's ``run``) covers all that
    changes a record: the model and its weights' SHA-256, the schedule, seed, dtype, temperature, top-k and labels
    mode, so ``resume`` refuses a file of any other run and names the difference."""
    temp = temperature if temperature is not None else clf.profile.temperature or 1.0
    run_key = clf.run_key(seed, found.candidates, weights=weights_identity(clf.model),
                          dtype=str(clf.dtype).removeprefix("torch."), temperature=float(temp), topk=topk,
                          labels=labels)
    metrics = Metrics(len(clf.profile.stages), len(found.candidates))
    if csv is not None and dist.is_main:
        check_csv(Path(csv), list(summary_row(metrics, clf.profile, run_key, None, None, 0, 0.0)))
    with results_file(out, resume, run_key, dist) as results:
        todo = [it for it in found.items if it.file not in results.done]
        run = ClassifyRun(clf, found, run_key, results, todo, metrics,
                          dict(seed=seed, temperature=temperature, topk=topk, dist=dist, ood_score=ood_score),
                          keep_records, safe=len(results.done))
        run.count(results.resumed.done.values() if results.resumed else ())
        yield run
