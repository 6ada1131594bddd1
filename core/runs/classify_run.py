"""One classification run over collected inputs: its results file (new or resumed, records already there counted
into the metrics), the images still to do, and the running counts a front end shows as progress and reports at the
end. Every batch is on disk before it is counted, so ``safe`` is always what an interrupt leaves in the file."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from ..classifier import Classifier
from ..io.data import Inputs, Item
from ..io.distributed import Dist
from ..io.hf_data import datasets_fingerprint
from ..io.records import Record, RunIdentity
from ..io.results import ResultsFile, results_file
from ..io.summary import Metrics, append_csv_summary, check_csv, summary_row
from ..tasks.ood import DEFAULT_OOD_SCORE, check_score


@dataclass
class ClassifyRun:
    """A run in progress; iterate it to classify the images still to do, batch by batch."""

    clf: Classifier
    found: Inputs
    run_key: RunIdentity
    results: ResultsFile
    todo: list[Item]
    metrics: Metrics
    options: dict                    # seed, temperature, topk, dist: what classify_items takes
    keep_records: int = 0            # keep this run's first records in ``records`` (for a front end to show)
    records: list[Record] = field(default_factory=list)
    new: int = 0                     # records this run made
    unreadable: int = 0              # of them, skipped records
    safe: int = 0                    # records in the results file
    start: float = field(default_factory=time.perf_counter)
    gflops: list[float] = field(default_factory=list)    # executed GFLOPs of each classified record in the file
    paper_gflops: list[float] = field(default_factory=list)   # … in the paper's convention
    started: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def count(self, records) -> None:
        """Add records (new or resumed) to the metrics and the compute total."""
        for rec in records:
            self.metrics.add(rec)
            if rec["status"] != "skipped" and rec.get("gflops"):
                self.gflops.append(rec["gflops"]["executed"])
                self.paper_gflops.append(rec["gflops"]["paper"])

    @property
    def gflops_per_image(self) -> float | None:
        """Mean executed GFLOPs per classified image, read from the records (exits and reuse included)."""
        return sum(self.gflops) / len(self.gflops) if self.gflops else None

    def __iter__(self) -> Iterator[list[Record]]:
        for batch in self.clf.classify_items(self.todo, self.found.candidates, run_key=self.run_key, **self.options):
            resumed = self.results.resumed
            fresh = [r for r in batch if resumed is None or not resumed.repeats(r)]    # a skip again: known
            self.results.write(fresh)
            self.count(batch)
            self.new, self.safe = self.new + len(batch), self.safe + len(fresh)
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
        """This run classified images and could read none of them (nor had a resumed file any it could)."""
        return bool(self.new) and self.unreadable == self.new and not self.results.done

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
        done = resumed.done if resumed is not None else {}
        other = sum(it.file in done and done[it.file]["label"] not in (it.accepted or (it.label,))
                    for it in self.found.items)
        if other:
            out.append(f"note: {other} images already done were labelled otherwise by the run that classified them "
                       "(a class folder classified alone is unlabelled); their records keep that label, and report "
                       "counts them by it")
        if resumed is not None and (self.results.done or resumed.torn or resumed.retried):
            out.append(f"resume: {len(self.results.done)} images already done, {len(self.todo)} to go"
                       + (f" ({resumed.retried} skipped before, tried again)" if resumed.retried else "")
                       + (" (cut off a torn last line)" if resumed.torn else ""))
        return out

    def append_summary(self, csv: str | os.PathLike, dataset: str | None = None, subset: str | None = None,
                       inputs: Sequence[str | os.PathLike] = ()) -> bool:
        """Add this run's summary row to ``csv`` (``inputs``: as given); False (nothing added) when it classified
        nothing new."""
        if self.new:
            append_csv_summary(csv, summary_row(
                self.metrics, self.clf.profile, self.run_key, started=self.started, threads=self.clf.threads,
                inputs=[str(i) for i in inputs], dataset=dataset, subset=subset,
                gflops=(self.gflops, self.paper_gflops), new=self.new, seconds=self.seconds))
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
    rule = clf.profile.ood
    run_key = clf.run_key(seed, found.candidates, temperature=float(temp), topk=topk, labels=labels,
                          ood_score=check_score(ood_score or (rule.score if rule else DEFAULT_OOD_SCORE)),
                          inputs=datasets_fingerprint(it.source.fingerprint for it in found.items
                                                      if it.source is not None))
    # what the run ran on, kept beside its identity (not in the fingerprint)
    run_key = run_key.model_copy(update={"threads": clf.threads})
    metrics = Metrics(len(clf.profile.stages), len(found.candidates))
    if csv is not None and dist.is_main:
        check_csv(Path(csv))
    with results_file(out, resume, run_key, dist) as results:
        todo = [it for it in found.items if it.file not in results.done]
        run = ClassifyRun(clf, found, run_key, results, todo, metrics,
                          dict(seed=seed, temperature=temperature, topk=topk, dist=dist, ood_score=ood_score),
                          keep_records, safe=len(results.done))
        run.count(results.resumed.done.values() if results.resumed else ())
        yield run
