"""Names on the wire: subjects, streams, consumers, KV buckets (messaging.md).

With the default prefix ``redrive`` these are exactly the names of the contract; another
prefix isolates a whole system on a shared NATS server (tests, staging next to prod).
"""

from __future__ import annotations

from dataclasses import dataclass

FILE_EVENT_KINDS = ("succeeded", "failed", "errored", "retrying", "checkpoint")
RUN_EVENT_KINDS = (
    "started", "completed", "completed_with_errors", "failed", "cancelled", "retrying",
    "recovery_started", "recovered", "recovery_failed",
)


@dataclass(frozen=True, slots=True)
class Names:
    prefix: str = "redrive"

    # Streams and consumers.
    @property
    def jobs_stream(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_JOBS"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_EVENTS"

    @property
    def advisories_stream(self) -> str:
        """Where the jobs consumer's max-deliveries advisories are kept until the coordinator
        has dealt with them (they are core NATS messages: sent while it is down, lost)."""
        return f"{self.prefix.upper().replace('-', '_')}_ADVISORIES"

    executor_consumer = "executor"
    results_consumer = "coordinator-results"
    notifier_consumer = "notifier"
    advisories_consumer = "coordinator-advisories"

    @property
    def breakers_bucket(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_BREAKERS"

    @property
    def run_stops_bucket(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_RUN_STOPS"

    def run_stop_subject(self, run_id: str) -> str:
        """Publishing here is a KV put (how the outbox writes to the bucket)."""
        return f"$KV.{self.run_stops_bucket}.{run_id}"

    @property
    def handlers_bucket(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_HANDLERS"

    @property
    def attempts_bucket(self) -> str:
        return f"{self.prefix.upper().replace('-', '_')}_ATTEMPTS"

    # Subjects.
    @property
    def jobs_all(self) -> str:
        return f"{self.prefix}.jobs.>"

    def job(self, tenant_id: str) -> str:
        return f"{self.prefix}.jobs.{tenant_id}"

    @property
    def events_all(self) -> str:
        return f"{self.prefix}.events.>"

    @property
    def file_events_all(self) -> str:
        return f"{self.prefix}.events.file.>"

    def file_event(self, kind: str) -> str:
        return f"{self.prefix}.events.file.{kind}"

    @property
    def notifications_live(self) -> str:
        """Core NATS, no stream: each notification as the notifier stores it, for the
        gateways' live streams (the stored list is the record; a client that missed one
        reads the list)."""
        return f"{self.prefix}.notifications"

    @property
    def run_events_all(self) -> str:
        return f"{self.prefix}.events.run.>"

    def run_event(self, kind: str) -> str:
        return f"{self.prefix}.events.run.{kind}"

    @property
    def notifier_filters(self) -> list[str]:
        """What the notifier tells anyone about: run events (a file's failure among them, as
        the coordinator applied it: ``run.file_failed``). Narrower than messaging.md's
        ``events.>``: pulling and acking every succeeded file only to drop it cost the
        notifier and the server a delivery and an ack per file."""
        return [self.run_events_all]

    @property
    def runs_alive(self) -> str:
        """Executors' heartbeats for runs with a job in flight (core NATS, outside the
        streams: a lost one only matters if a whole lease of them is lost)."""
        return f"{self.prefix}.runs.alive"

    def breaker_event(self, state: str) -> str:
        return f"{self.prefix}.events.breaker.{state}"

    def service(self, service: str, verb: str) -> str:
        return f"{self.prefix}.svc.{service}.{verb}"

    @property
    def max_deliveries_advisory(self) -> str:
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.jobs_stream}.{self.executor_consumer}"
