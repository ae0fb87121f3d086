"""Realistic events of an autonomous-development platform, for the demo and the benchmarks.

Issues are opened, planned and assigned; pull requests are opened, reviewed and merged; LLM calls
and CI runs happen along the way. Every event is tagged with the ids it concerns (``issueId``,
``prId``, ``userId``) and where it happened (``provider``, ``platform``). The generator is
deterministic for a seed, so runs are comparable.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from tamma_events.model import DomainEvent, uuid7

__all__ = ["EVENT_TYPES", "generate_events"]

PROVIDERS = ("anthropic", "openai", "google", "mistral", "local")
PLATFORMS = ("github", "gitlab", "bitbucket", "gitea")
MODELS = {
    "anthropic": ("claude-opus", "claude-sonnet", "claude-haiku"),
    "openai": ("gpt-large", "gpt-mini"),
    "google": ("gemini-pro", "gemini-flash"),
    "mistral": ("mistral-large", "codestral"),
    "local": ("llama-70b", "qwen-coder"),
}
WORDS = (
    "parser",
    "cache",
    "retry",
    "timeout",
    "migration",
    "index",
    "flaky",
    "test",
    "login",
    "api",
    "schema",
    "deploy",
    "memory",
    "leak",
    "docs",
    "refactor",
    "billing",
    "webhook",
    "queue",
    "auth",
)
EVENT_TYPES = (
    "IssueCreated",
    "IssueAssigned",
    "PlanProposed",
    "LlmCallCompleted",
    "PullRequestOpened",
    "ReviewSubmitted",
    "CiRunCompleted",
    "PullRequestMerged",
    "IssueClosed",
)
# How often each type occurs: agents mostly call models and run CI.
_CUMULATIVE_WEIGHTS = (8, 16, 24, 59, 65, 75, 90, 95, 100)


def _title(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))).capitalize()


def generate_events(
    count: int,
    *,
    seed: int = 7,
    issues: int | None = None,
    start: datetime | None = None,
) -> Iterator[DomainEvent]:
    """``count`` events over ``issues`` issues (default: one per 50 events), in time order."""
    rng = random.Random(seed)
    issues = issues or max(1, count // 50)
    clock = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
    step = timedelta(milliseconds=250)
    users = [f"user-{i}" for i in range(max(10, issues // 20))]
    id_rng = random.Random(seed * 7919 + 1)
    base_ms = int(clock.timestamp() * 1000)
    for n in range(count):
        issue = rng.randrange(issues)
        provider = rng.choice(PROVIDERS)
        platform = PLATFORMS[issue % len(PLATFORMS)]
        user = users[issue % len(users)]
        pr = f"PR-{issue * 3 + rng.randrange(3)}"
        kind = rng.choices(EVENT_TYPES, cum_weights=_CUMULATIVE_WEIGHTS)[0]
        tags = {
            "issueId": f"ISSUE-{issue}",
            "userId": user,
            "provider": provider,
            "platform": platform,
        }
        data: dict[str, Any]
        if kind == "IssueCreated":
            data = {
                "title": _title(rng),
                "labels": rng.sample(WORDS, 2),
                "priority": rng.randint(1, 4),
            }
        elif kind == "IssueAssigned":
            data = {
                "assignee": user,
                "reason": "least-loaded agent",
                "queue_depth": rng.randint(0, 40),
            }
        elif kind == "PlanProposed":
            data = {
                "steps": [_title(rng) for _ in range(rng.randint(2, 5))],
                "estimate_minutes": rng.randint(5, 240),
            }
        elif kind == "LlmCallCompleted":
            model = rng.choice(MODELS[provider])
            data = {
                "model": model,
                "prompt_tokens": rng.randint(200, 30_000),
                "completion_tokens": rng.randint(20, 4_000),
                "latency_ms": round(rng.lognormvariate(7, 0.6), 1),
                "cost_usd": round(rng.random() / 10, 6),
                "cache_hit": rng.random() < 0.3,
                "purpose": rng.choice(("plan", "code", "review", "summarise")),
            }
        elif kind in ("PullRequestOpened", "PullRequestMerged"):
            tags["prId"] = pr
            data = {
                "title": _title(rng),
                "branch": f"fix/{rng.choice(WORDS)}-{issue}",
                "files_changed": rng.randint(1, 30),
                "additions": rng.randint(1, 800),
                "deletions": rng.randint(0, 400),
            }
        elif kind == "ReviewSubmitted":
            tags["prId"] = pr
            data = {
                "verdict": rng.choice(("approve", "request_changes", "comment")),
                "comments": rng.randint(0, 12),
            }
        elif kind == "CiRunCompleted":
            tags["prId"] = pr
            data = {
                "pipeline": rng.choice(("unit", "integration", "lint", "e2e")),
                "status": rng.choice(("passed", "passed", "passed", "failed")),
                "duration_s": rng.randint(20, 1800),
                "runner": f"runner-{rng.randrange(16)}",
            }
        else:
            data = {
                "resolution": rng.choice(("fixed", "duplicate", "wontfix")),
                "reopen_count": rng.randint(0, 2),
            }
        metadata = {
            "correlationId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "source": "tamma-agent",
            "schemaVersion": 1,
        }
        timestamp = clock + step * n
        # A UUIDv7 from the event's own time: deterministic for the seed, and time-ordered.
        ms = base_ms + 250 * n
        event_id = uuid7(ms, id_rng.getrandbits(74))
        yield DomainEvent(kind, data, tags, metadata, event_id=event_id, timestamp=timestamp)
