from tamma_events import AppendCondition, DomainEvent, EventStore, Query


def test_append_and_read_round_trip(store: EventStore) -> None:
    event = DomainEvent("IssueCreated", {"title": "x", "n": 1.5}, {"issueId": "I-1"}, {"by": "me"})
    position = store.append(event)
    assert position == 1
    result = store.read()
    assert result.head == 1
    [stored] = result
    assert stored.position == 1
    assert (stored.event_id, stored.event_type, stored.data, stored.tags, stored.metadata) == (
        event.event_id,
        event.event_type,
        event.data,
        event.tags,
        event.metadata,
    )
    assert stored.timestamp == event.timestamp
    assert len(stored.hash) == 32
    assert store.get_event(event.event_id) == stored
    cond = AppendCondition(Query.of(tags={"issueId": "I-1"}), after=result.head)
    assert store.append(DomainEvent("IssueClosed", tags={"issueId": "I-1"}), cond) == 2
