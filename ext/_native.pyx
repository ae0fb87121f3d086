# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The native codec: validates a batch of events and encodes it as PostgreSQL binary COPY rows.

It implements exactly the functions of the reference in ``tamma_events/codec/reference.py`` (read that
first: it is the spec). Every rule is checked here, natively; when an event breaks one, the
reference's `event_error` words the error, so both implementations raise the same errors.
"""

from cpython cimport array
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.datetime cimport (
    datetime_day,
    datetime_hour,
    datetime_microsecond,
    datetime_minute,
    datetime_month,
    datetime_second,
    datetime_tzinfo,
    datetime_new,
    datetime_year,
    import_datetime,
)
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLongMask,
    PyLong_FromUnsignedLongLong,
)
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.dict cimport PyDict_Next
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport (
    PyUnicode_1BYTE_KIND,
    PyUnicode_2BYTE_KIND,
    PyUnicode_AsUTF8AndSize,
    PyUnicode_DATA,
    PyUnicode_DecodeUTF8,
    PyUnicode_GET_LENGTH,
    PyUnicode_KIND,
)
from libc.math cimport copysign, fabs, isfinite
from libc.stdint cimport int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, realloc, strtol
from libc.string cimport memchr, memcmp, memcpy, memset, strchr, strlen

import array as _array
import hashlib
import uuid
from datetime import datetime, timezone

import msgspec

import_datetime()

from tamma_events.codec import reference as _pycodec
from tamma_events.codec.reference import PreparedBatch
from tamma_events import model as _model
from tamma_events.model import DomainEvent, SequencedEvent

cdef object _encode = msgspec.json.Encoder(order="sorted").encode
cdef object _sha256 = hashlib.sha256
cdef object _UUID = uuid.UUID
cdef object _UTC = timezone.utc
cdef object _DomainEvent = DomainEvent
cdef object _event_error = _pycodec.event_error
cdef object _timestamp_us = _pycodec._timestamp_us
cdef object _parse_uuid = _pycodec.parse_uuid
cdef object _empty_batch_error = _pycodec.empty_batch_error
cdef object _duplicate_in_batch_error = _pycodec.duplicate_in_batch_error
cdef object _size_error = _pycodec.size_error
cdef object _canonical = _pycodec.canonical
cdef double FLOAT_EXPONENT_FROM = _pycodec.FLOAT_EXPONENT_FROM
cdef object _EventStoreError = _pycodec.EventStoreError

cdef int MAX_DEPTH = _pycodec.MAX_DEPTH
cdef Py_ssize_t MAX_INT_BITS = _pycodec.MAX_INT_BITS
cdef object _check_seal = _pycodec._check_seal
cdef Py_ssize_t MAX_EVENT_TYPE_LENGTH = _pycodec.MAX_EVENT_TYPE_LENGTH
cdef Py_ssize_t MAX_TAG_KEY_LENGTH = _pycodec.MAX_TAG_KEY_LENGTH
cdef Py_ssize_t HASH_SIZE = _pycodec.HASH_SIZE
cdef Py_ssize_t HASH_FIELD_SIZE = _pycodec.HASH_FIELD_SIZE
cdef Py_ssize_t POSITION_OFFSET = _pycodec.POSITION_OFFSET
# Row bytes besides event_type and the three JSON texts: field count, 8 length words, position,
# id, timestamp, 3 jsonb version bytes and the hash.
cdef Py_ssize_t ROW_FIXED_SIZE = 2 + 8 * 4 + 8 + 16 + 8 + 3 + 32
cdef uint16_t FIELD_COUNT = len(_pycodec.COPY_COLUMNS)

# Days from 0001-01-01 to 2000-01-01 (the PostgreSQL epoch), in the proleptic Gregorian calendar.
cdef int64_t PG_EPOCH_ORDINAL = 730120


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member


cdef Py_ssize_t _slot_offset(object cls, str name) except -1:
    """Where a msgspec Struct keeps a field: its slot's byte offset in the instance."""
    descriptor = cls.__dict__[name]
    if type(descriptor).__name__ != "member_descriptor":
        raise TypeError(f"{cls.__name__}.{name} is not a slot")
    return (<PyMemberDescrObject *>descriptor).d_member.offset


# Fields of DomainEvent read straight from their slots: the generic attribute lookup costs more
# than validating the field. SequencedEvent extends DomainEvent, so the offsets hold for both.
cdef Py_ssize_t OFF_EVENT_ID = _slot_offset(DomainEvent, "event_id")
cdef Py_ssize_t OFF_EVENT_TYPE = _slot_offset(DomainEvent, "event_type")
cdef Py_ssize_t OFF_TIMESTAMP = _slot_offset(DomainEvent, "timestamp")
cdef Py_ssize_t OFF_TAGS = _slot_offset(DomainEvent, "tags")
cdef Py_ssize_t OFF_METADATA = _slot_offset(DomainEvent, "metadata")
cdef Py_ssize_t OFF_DATA = _slot_offset(DomainEvent, "data")
cdef object _SequencedEvent = SequencedEvent


cdef inline object _slot(object obj, Py_ssize_t offset):
    cdef PyObject *value = (<PyObject **>((<char *><PyObject *>obj) + offset))[0]
    if value == NULL:
        raise AttributeError("an event field is unset")
    return <object>value


cdef inline void _put16(char *p, uint16_t v) noexcept nogil:
    p[0] = <char>(v >> 8)
    p[1] = <char>v


cdef inline void _put32(char *p, uint32_t v) noexcept nogil:
    p[0] = <char>(v >> 24)
    p[1] = <char>(v >> 16)
    p[2] = <char>(v >> 8)
    p[3] = <char>v


cdef inline void _put64(char *p, uint64_t v) noexcept nogil:
    _put32(p, <uint32_t>(v >> 32))
    _put32(p + 4, <uint32_t>v)


cdef inline bint _text_ok(object text) noexcept:
    """False when ``text`` holds a NUL or a lone surrogate (neither can be stored by PostgreSQL)."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    cdef Py_ssize_t i
    cdef unsigned int kind = PyUnicode_KIND(text)
    cdef void *data = PyUnicode_DATA(text)
    cdef uint16_t c2
    cdef uint32_t c4
    if kind == PyUnicode_1BYTE_KIND:
        return memchr(data, 0, n) == NULL
    if kind == PyUnicode_2BYTE_KIND:
        for i in range(n):
            c2 = (<uint16_t *>data)[i]
            if c2 == 0 or (c2 >= 0xD800 and c2 <= 0xDFFF):
                return False
        return True
    for i in range(n):
        c4 = (<uint32_t *>data)[i]
        if c4 == 0 or (c4 >= 0xD800 and c4 <= 0xDFFF):
            return False
    return True


# What `_json_ok` finds: nothing wrong, a rule broken, or values `canonical` must rewrite.
cdef enum:
    JSON_OK = 1
    JSON_BAD = 0
    JSON_REWRITE = 3


cdef int _json_ok(object value, int depth) except -1:
    """Whether ``value`` is JSON that PostgreSQL's jsonb stores faithfully (see `_check_json`),
    and whether `canonical` has to rewrite part of it (see `FLOAT_EXPONENT_FROM`)."""
    cdef type kind = type(value)
    cdef Py_ssize_t pos = 0, i, n
    cdef PyObject *key
    cdef PyObject *item
    cdef int found = JSON_OK, sub, overflow
    cdef double x
    if kind is str:
        return JSON_OK if _text_ok(value) else JSON_BAD
    if kind is dict or kind is list or kind is tuple:
        if depth > MAX_DEPTH:
            return JSON_BAD
        if kind is dict:
            while PyDict_Next(value, &pos, &key, &item):
                if type(<object>key) is not str or not _text_ok(<object>key):
                    return JSON_BAD
                sub = _json_ok(<object>item, depth + 1)
                if sub == JSON_BAD:
                    return JSON_BAD
                found |= sub
        elif kind is list:
            n = PyList_GET_SIZE(value)
            for i in range(n):
                sub = _json_ok(<object>PyList_GET_ITEM(value, i), depth + 1)
                if sub == JSON_BAD:
                    return JSON_BAD
                found |= sub
        else:
            n = PyTuple_GET_SIZE(value)
            for i in range(n):
                sub = _json_ok(<object>PyTuple_GET_ITEM(value, i), depth + 1)
                if sub == JSON_BAD:
                    return JSON_BAD
                found |= sub
        return found
    if kind is float:
        x = PyFloat_AS_DOUBLE(value)
        if not isfinite(x):
            return JSON_BAD
        if fabs(x) >= FLOAT_EXPONENT_FROM or (x == 0.0 and copysign(1.0, x) < 0):
            return JSON_REWRITE
        return JSON_OK
    if kind is int:
        PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow and value.bit_length() > MAX_INT_BITS:
            return JSON_BAD
        return JSON_OK
    return JSON_OK if (kind is bool or value is None) else JSON_BAD


cdef object _json_object(object value):
    """``value`` as it is to be encoded (see `canonical`) when it is a valid JSON object for
    data or metadata; None when it is not."""
    if type(value) is not dict:
        return None
    cdef int found = _json_ok(value, 1)
    if found == JSON_BAD:
        return None
    return _canonical(value) if found == JSON_REWRITE else value


cdef inline bint _tags_ok(object tags) except -1:
    cdef Py_ssize_t pos = 0, n
    cdef PyObject *key
    cdef PyObject *item
    if type(tags) is not dict:
        return False
    while PyDict_Next(tags, &pos, &key, &item):
        if type(<object>key) is not str or type(<object>item) is not str:
            return False
        n = PyUnicode_GET_LENGTH(<object>key)
        if n < 1 or n > MAX_TAG_KEY_LENGTH:
            return False
        if not _text_ok(<object>key) or not _text_ok(<object>item):
            return False
    return True


cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    """Days since 0001-01-01 (ordinal - 1) of a proleptic Gregorian date."""
    cdef int64_t days_before_year, days_before_month
    # Cumulative days before each month in a common year.
    cdef int64_t[12] cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334]
    y -= 1
    days_before_year = y * 365 + y // 4 - y // 100 + y // 400
    days_before_month = cum[m - 1]
    y += 1
    if m > 2 and (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)):
        days_before_month += 1
    return days_before_year + days_before_month + d - 1


cdef bint _timestamp_us_fast(object value, int64_t *out) except -1:
    """Microseconds since 2000-01-01 UTC for a datetime in UTC; False for anything else."""
    if type(value) is not datetime or datetime_tzinfo(value) is not _UTC:
        return False
    cdef int64_t days = (_days_from_civil(datetime_year(value), datetime_month(value),
                                          datetime_day(value)) - PG_EPOCH_ORDINAL + 1)
    out[0] = (((days * 24 + datetime_hour(value)) * 60 + datetime_minute(value)) * 60
              + datetime_second(value)) * 1000000 + datetime_microsecond(value)
    return True


cdef object _reject(object event, Py_ssize_t index):
    """The reference's wording of why ``event`` was rejected (it has one author)."""
    error = _event_error(event, index)
    if error is None:
        raise AssertionError(
            f"the native codec rejected event {index} but the reference accepts it: {event!r}"
        )
    return error


cdef extern from "_sha256.h":
    bint tamma_sha256_available()
    void *tamma_sha256_ctx_new()
    void tamma_sha256_ctx_free(void *ctx)
    int tamma_sha256_2(void *ctx, const unsigned char *a, size_t na,
                       const unsigned char *b, size_t nb, unsigned char *md) nogil

#: True when the hash chain is computed by libcrypto directly rather than through hashlib.
HAVE_LIBCRYPTO = tamma_sha256_available()


cdef inline bint _uuid_bytes(object event_id, char *out) except -1:
    """The 16 bytes of a UUID (or UUID string); False when it is neither."""
    cdef object value
    cdef uint64_t hi, lo
    if isinstance(event_id, _UUID):
        value = event_id.int
    elif isinstance(event_id, str):
        try:
            value = _parse_uuid(event_id).int
        except ValueError:
            return False
    else:
        return False
    lo = PyLong_AsUnsignedLongLongMask(value)
    hi = PyLong_AsUnsignedLongLongMask(value >> 64)
    _put64(out, hi)
    _put64(out + 8, lo)
    return True


cdef Py_ssize_t _split_elements(const char *text, Py_ssize_t size, Py_ssize_t *spans,
                                Py_ssize_t expected) noexcept nogil:
    """Record the start and end of each element of the JSON array ``text`` (compact output of
    msgspec whose elements are objects); returns how many were found."""
    cdef Py_ssize_t i = 0, found = 0, j
    cdef int depth = 0
    cdef char c
    cdef const char *quote
    while i < size:
        c = text[i]
        if c == b'"':
            # Jump to the closing quote: the next quote not escaped by an odd run of backslashes.
            while True:
                quote = <const char *>memchr(text + i + 1, b'"', size - i - 1)
                if quote == NULL:
                    return -1
                i = quote - text
                j = i - 1
                while text[j] == b'\\':
                    j -= 1
                if (i - 1 - j) % 2 == 0:
                    break
        elif c == b'{' or c == b'[':
            depth += 1
            if depth == 2:
                if found >= expected:
                    return -1
                spans[2 * found] = i
        elif c == b'}' or c == b']':
            if depth == 2:
                spans[2 * found + 1] = i + 1
                found += 1
            depth -= 1
        i += 1
    return found


cdef inline char *_put_json_fields(char *p, const char *json_text, const Py_ssize_t *spans,
                                   Py_ssize_t first) noexcept nogil:
    """Write the three jsonb fields (tags, metadata, data) of a row at ``p``: for each, its
    length word, version byte 1 and the JSON text at ``spans[2k]..spans[2k+1]`` of
    ``json_text``, k from ``first``. Returns the end."""
    cdef Py_ssize_t k, n
    for k in range(first, first + 3):
        n = spans[2 * k + 1] - spans[2 * k]
        _put32(p, <uint32_t>(n + 1))
        p[4] = 1
        memcpy(p + 5, json_text + spans[2 * k], n)
        p += 5 + n
    return p


def prepare(events, Py_ssize_t max_event_bytes=_pycodec.DEFAULT_MAX_EVENT_BYTES,
            Py_ssize_t first_index=0):
    """Validate and encode a batch; see `tamma_events.codec.reference.prepare`.

    Pass 1 checks every event natively; one msgspec call then encodes the tags, metadata and
    data of the whole batch as one JSON array, which pass 2 cuts into the jsonb fields of the rows.
    """
    if not isinstance(events, (list, tuple)):
        events = list(events)
    cdef Py_ssize_t count = len(events)
    cdef Py_ssize_t index, n, row_size, total, type_len, k, cursor
    cdef int64_t *stamps = NULL
    cdef char *ids = NULL
    cdef Py_ssize_t *spans = NULL
    cdef Py_ssize_t *sizes = NULL
    cdef const char *json_text
    cdef const char *type_utf8
    cdef char *p
    cdef bytearray buffer
    cdef array.array offsets
    cdef long long *offs
    cdef dict seen = {}
    cdef list values, types
    cdef object event, event_id, event_type, timestamp, tags, metadata, data, first, id_key
    cdef object json_bytes

    if count == 0:
        raise _empty_batch_error()
    values = [None] * (3 * count)
    types = [None] * count
    stamps = <int64_t *>PyMem_Malloc(count * sizeof(int64_t))
    ids = <char *>PyMem_Malloc(count * 16)
    spans = <Py_ssize_t *>PyMem_Malloc(6 * count * sizeof(Py_ssize_t))
    sizes = <Py_ssize_t *>PyMem_Malloc(count * sizeof(Py_ssize_t))
    if stamps == NULL or ids == NULL or spans == NULL or sizes == NULL:
        PyMem_Free(stamps); PyMem_Free(ids); PyMem_Free(spans); PyMem_Free(sizes)
        raise MemoryError()
    try:
        # Pass 1: every rule, every event, in order.
        for index in range(count):
            event = events[index]
            if type(event) is _DomainEvent or type(event) is _SequencedEvent:
                event_id = _slot(event, OFF_EVENT_ID)
                event_type = _slot(event, OFF_EVENT_TYPE)
                timestamp = _slot(event, OFF_TIMESTAMP)
                tags = _slot(event, OFF_TAGS)
                metadata = _slot(event, OFF_METADATA)
                data = _slot(event, OFF_DATA)
            elif isinstance(event, _DomainEvent):
                event_id = event.event_id
                event_type = event.event_type
                timestamp = event.timestamp
                tags = event.tags
                metadata = event.metadata
                data = event.data
            else:
                raise _reject(event, first_index + index)
            if not _uuid_bytes(event_id, ids + 16 * index):
                raise _reject(event, first_index + index)
            if not isinstance(event_type, str):
                raise _reject(event, first_index + index)
            n = PyUnicode_GET_LENGTH(event_type)
            if n < 1 or n > MAX_EVENT_TYPE_LENGTH or not _text_ok(event_type):
                raise _reject(event, first_index + index)
            if not _timestamp_us_fast(timestamp, stamps + index):
                try:
                    stamps[index] = _timestamp_us(event, index, "")
                except _EventStoreError:
                    raise _reject(event, first_index + index)
            if not _tags_ok(tags):
                raise _reject(event, first_index + index)
            metadata = _json_object(metadata)
            data = _json_object(data)
            if metadata is None or data is None:
                raise _reject(event, first_index + index)
            id_key = PyBytes_FromStringAndSize(ids + 16 * index, 16)
            first = seen.setdefault(id_key, index)
            if <Py_ssize_t>first != index:
                raise _duplicate_in_batch_error(first_index + index, first_index + <Py_ssize_t>first,
                                                _UUID(bytes=id_key))
            values[3 * index] = tags
            values[3 * index + 1] = metadata
            values[3 * index + 2] = data
            types[index] = event_type

        # One encoder call for the JSON of the whole batch.
        json_bytes = _encode(values)
        json_text = PyBytes_AS_STRING(json_bytes)
        if _split_elements(json_text, PyBytes_GET_SIZE(json_bytes), spans, 3 * count) != 3 * count:
            raise AssertionError("could not split the encoded JSON of the batch")

        # Pass 2: row sizes against the limit, then the rows into one buffer of the exact size.
        total = 0
        for index in range(count):
            PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(types, index), &type_len)
            row_size = ROW_FIXED_SIZE + type_len
            for k in range(3 * index, 3 * index + 3):
                row_size += spans[2 * k + 1] - spans[2 * k]
            if row_size > max_event_bytes:
                raise _size_error(first_index + index, PyBytes_FromStringAndSize(ids + 16 * index, 16),
                                  row_size, max_event_bytes)
            sizes[index] = row_size
            total += row_size

        buffer = PyByteArray_FromStringAndSize(NULL, total)
        p = PyByteArray_AS_STRING(buffer)
        offsets = array.clone(array.array("q"), count + 1, False)
        offs = offsets.data.as_longlongs
        offs[0] = 0
        cursor = 0
        for index in range(count):
            type_utf8 = PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(types, index), &type_len)
            _put16(p, FIELD_COUNT)
            _put32(p + 2, 8)
            memset(p + 6, 0, 8)
            _put32(p + 14, 16)
            memcpy(p + 18, ids + 16 * index, 16)
            _put32(p + 34, <uint32_t>type_len)
            memcpy(p + 38, type_utf8, type_len)
            p += 38 + type_len
            _put32(p, 8)
            _put64(p + 4, <uint64_t>stamps[index])
            p += 12
            p = _put_json_fields(p, json_text, spans, 3 * index)
            _put32(p, <uint32_t>HASH_SIZE)
            memset(p + 4, 0, HASH_SIZE)
            p += HASH_FIELD_SIZE
            cursor += sizes[index]
            offs[index + 1] = cursor
        return PreparedBatch(buffer, offsets)
    finally:
        PyMem_Free(stamps)
        PyMem_Free(ids)
        PyMem_Free(spans)
        PyMem_Free(sizes)


def seal(batch, first_position, prev_hash, *, bint chain=True):
    """Write positions and the hash chain; see `tamma_events.codec.reference.seal`."""
    _check_seal(batch, first_position, prev_hash)
    cdef int64_t first = first_position
    cdef bytearray buffer = batch.buffer
    cdef long long[::1] offs = batch.offsets
    cdef Py_ssize_t count = batch.count
    cdef Py_ssize_t i, start, end
    cdef unsigned char *data = <unsigned char *>PyByteArray_AS_STRING(buffer)
    cdef unsigned char *prev = <unsigned char *>PyBytes_AS_STRING(prev_hash)
    cdef void *ctx
    cdef object view
    cdef bytes digest
    if len(buffer) != offs[count]:
        raise ValueError("the batch's buffer does not match its offsets")
    for i in range(count):
        _put64(<char *>data + offs[i] + POSITION_OFFSET, <uint64_t>(first + i))
    if not chain:
        return prev_hash
    if HAVE_LIBCRYPTO:
        ctx = tamma_sha256_ctx_new()
        if ctx == NULL:
            raise MemoryError()
        try:
            with nogil:
                for i in range(count):
                    start = offs[i]
                    end = offs[i + 1]
                    if not tamma_sha256_2(ctx, prev, HASH_SIZE, data + start,
                                          end - HASH_FIELD_SIZE - start, data + end - HASH_SIZE):
                        break
                    prev = data + end - HASH_SIZE
                else:
                    i = count
        finally:
            tamma_sha256_ctx_free(ctx)
        if i != count:
            raise RuntimeError("libcrypto failed to compute SHA-256")
        return PyBytes_FromStringAndSize(<char *>prev, HASH_SIZE)
    view = memoryview(buffer)
    try:
        digest = prev_hash
        for i in range(count):
            start = offs[i]
            end = offs[i + 1]
            digest = _sha256(digest + view[start:end - HASH_FIELD_SIZE]).digest()
            memcpy(data + end - HASH_SIZE, <const char *>digest, HASH_SIZE)
    finally:
        view.release()
    return digest


# ---------------------------------------------------------------------------------------------
# decoding exports: binary COPY rows into Arrow buffers (the reference is _pycodec.decode_rows)

cdef object _decode_error = _pycodec.decode_error
cdef object _DecodedRows = _pycodec.DecodedRows
cdef int64_t PG_EPOCH_US = _pycodec.PG_EPOCH_US
cdef Py_ssize_t EXPORT_FIELDS = len(_pycodec.EXPORT_COLUMNS)
cdef Py_ssize_t MAX_OFFSET = 2147483647
cdef int64_t TIME_LIMIT = (<int64_t>1) << 62

cdef enum Field:
    F_POSITION, F_EVENT_ID, F_EVENT_TYPE, F_TIMESTAMP, F_RECORDED_AT, F_TAGS, F_METADATA,
    F_DATA, F_HASH

cdef tuple FIELD_NAMES = _pycodec.EXPORT_COLUMNS


cdef struct Buf:
    char *p
    Py_ssize_t size
    Py_ssize_t cap


cdef extern from "Python.h":
    const Py_ssize_t PY_SSIZE_T_MAX


cdef int _reserve(Buf *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap if b.cap else 256
    cdef char *p
    if extra < 0 or extra > PY_SSIZE_T_MAX // 4 - b.size:
        raise MemoryError()
    if b.size + extra <= b.cap:
        return 0
    while cap < b.size + extra:
        cap *= 2
    p = <char *>PyMem_Realloc(b.p, cap)
    if p == NULL:
        raise MemoryError()
    b.p = p
    b.cap = cap
    return 0


cdef inline int _append(Buf *b, const char *src, Py_ssize_t n) except -1:
    if b.size + n > b.cap:
        _reserve(b, n)
    memcpy(b.p + b.size, src, n)
    b.size += n
    return 0


cdef inline int _append_offset(Buf *offsets, Py_ssize_t value) except -1:
    cdef int32_t v = <int32_t>value
    return _append(offsets, <const char *>&v, 4)


cdef inline int64_t _get64(const unsigned char *p) noexcept nogil:
    return <int64_t>(
        (<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40)
        | (<uint64_t>p[3] << 32) | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16)
        | (<uint64_t>p[6] << 8) | <uint64_t>p[7])


cdef inline int32_t _get32(const unsigned char *p) noexcept nogil:
    return <int32_t>((<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8)
                     | <uint32_t>p[3])


cdef inline int _hex(unsigned char c) noexcept nogil:
    if c'0' <= c <= c'9':
        return c - c'0'
    if c'a' <= c <= c'f':
        return c - c'a' + 10
    if c'A' <= c <= c'F':
        return c - c'A' + 10
    return -1


cdef inline Py_ssize_t _skip_space(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == c' ' or s[i] == c'\t' or s[i] == c'\n' or s[i] == c'\r'):
        i += 1
    return i


cdef Py_ssize_t _hex4(const unsigned char *s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The code unit of the four hex digits at ``i``, or -1."""
    cdef int a, b, c, d
    if i + 4 > n:
        return -1
    a = _hex(s[i]); b = _hex(s[i + 1]); c = _hex(s[i + 2]); d = _hex(s[i + 3])
    if a < 0 or b < 0 or c < 0 or d < 0:
        return -1
    return (a << 12) | (b << 8) | (c << 4) | d


cdef bint _utf8_ok(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """Whether ``s`` is well-formed UTF-8 (no overlong forms, surrogates or code points past
    U+10FFFF), as Python's strict decoder has it."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
        elif 0xC2 <= c <= 0xDF:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif 0xE0 <= c <= 0xEF:
            if i + 2 >= n or (s[i + 1] & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            if (c == 0xE0 and s[i + 1] < 0xA0) or (c == 0xED and s[i + 1] >= 0xA0):
                return False
            i += 3
        elif 0xF0 <= c <= 0xF4:
            if (i + 3 >= n or (s[i + 1] & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80
                    or (s[i + 3] & 0xC0) != 0x80):
                return False
            if (c == 0xF0 and s[i + 1] < 0x90) or (c == 0xF4 and s[i + 1] >= 0x90):
                return False
            i += 4
        else:
            return False
    return True


cdef Py_ssize_t _json_string(const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                             Buf *out) except -2:
    """Unescape the JSON string starting at ``s[i]`` (its opening quote) onto ``out``; the
    index after its closing quote, or -1 when it is malformed."""
    cdef Py_ssize_t start
    cdef Py_ssize_t unit, low
    cdef unsigned char c
    cdef char utf8[4]
    if i >= n or s[i] != c'"':
        return -1
    i += 1
    while True:
        start = i
        while i < n and s[i] != c'"' and s[i] != c'\\' and s[i] >= 0x20:
            i += 1
        _append(out, <const char *>(s + start), i - start)
        if i >= n or s[i] < 0x20:
            return -1
        if s[i] == c'"':
            return i + 1
        i += 1  # a backslash
        if i >= n:
            return -1
        c = s[i]
        i += 1
        if c == c'"' or c == c'\\' or c == c'/':
            utf8[0] = <char>c
        elif c == c'b':
            utf8[0] = c'\b'
        elif c == c'f':
            utf8[0] = c'\f'
        elif c == c'n':
            utf8[0] = c'\n'
        elif c == c'r':
            utf8[0] = c'\r'
        elif c == c't':
            utf8[0] = c'\t'
        elif c == c'u':
            unit = _hex4(s, i, n)
            if unit < 0:
                return -1
            i += 4
            if 0xD800 <= unit < 0xDC00:
                if i + 6 > n or s[i] != c'\\' or s[i + 1] != c'u':
                    return -1
                low = _hex4(s, i + 2, n)
                if not 0xDC00 <= low < 0xE000:
                    return -1
                i += 6
                unit = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
            elif 0xDC00 <= unit < 0xE000:
                return -1
            if unit < 0x80:
                utf8[0] = <char>unit
                _append(out, utf8, 1)
            elif unit < 0x800:
                utf8[0] = <char>(0xC0 | (unit >> 6))
                utf8[1] = <char>(0x80 | (unit & 0x3F))
                _append(out, utf8, 2)
            elif unit < 0x10000:
                utf8[0] = <char>(0xE0 | (unit >> 12))
                utf8[1] = <char>(0x80 | ((unit >> 6) & 0x3F))
                utf8[2] = <char>(0x80 | (unit & 0x3F))
                _append(out, utf8, 3)
            else:
                utf8[0] = <char>(0xF0 | (unit >> 18))
                utf8[1] = <char>(0x80 | ((unit >> 12) & 0x3F))
                utf8[2] = <char>(0x80 | ((unit >> 6) & 0x3F))
                utf8[3] = <char>(0x80 | (unit & 0x3F))
                _append(out, utf8, 4)
            continue
        else:
            return -1
        _append(out, utf8, 1)


cdef Py_ssize_t _tag_pairs_native(const unsigned char *s, Py_ssize_t n, Buf *key_offsets,
                                  Buf *key_data, Buf *value_offsets, Buf *value_data) except -2:
    """Append the pairs of the flat JSON object ``s`` (string values only, every pair kept, as
    in the reference); how many, -1 when it is anything else (or not UTF-8), -3 when the batch's keys or values outgrow int32 offsets."""
    cdef Py_ssize_t i = _skip_space(s, 0, n)
    cdef Py_ssize_t pairs = 0
    if not _utf8_ok(s, n):
        return -1
    if i >= n or s[i] != c'{':
        return -1
    i = _skip_space(s, i + 1, n)
    if i < n and s[i] == c'}':
        return 0 if _skip_space(s, i + 1, n) == n else -1
    while True:
        i = _json_string(s, i, n, key_data)
        if i < 0:
            return -1
        if key_data.size > MAX_OFFSET:
            return -3
        _append_offset(key_offsets, key_data.size)
        i = _skip_space(s, i, n)
        if i >= n or s[i] != c':':
            return -1
        i = _json_string(s, _skip_space(s, i + 1, n), n, value_data)
        if i < 0:
            return -1
        if value_data.size > MAX_OFFSET:
            return -3
        _append_offset(value_offsets, value_data.size)
        pairs += 1
        i = _skip_space(s, i, n)
        if i < n and s[i] == c',':
            i = _skip_space(s, i + 1, n)
            continue
        if i < n and s[i] == c'}':
            return pairs if _skip_space(s, i + 1, n) == n else -1
        return -1


cdef bytes _take(Buf *b):
    return PyBytes_FromStringAndSize(b.p, b.size) if b.size else b""


def decode_rows(rows, Py_ssize_t count):
    """Decode ``count`` binary COPY rows of the export columns into Arrow buffers: see
    `tamma_events.codec.reference.decode_rows`, which this matches byte for byte and error for
    error."""
    cdef const unsigned char[::1] view = memoryview(rows).cast("B")
    cdef const unsigned char *s = &view[0] if view.shape[0] else NULL
    cdef Py_ssize_t size = view.shape[0]
    cdef Py_ssize_t at = 0, row, field, length, entries = 0, pairs
    cdef int16_t fields
    cdef int64_t value
    cdef const unsigned char *v
    cdef Buf bufs[17]
    cdef Buf *b
    cdef Py_ssize_t k
    cdef object problem = None
    cdef Py_ssize_t bad_row = 0, bad_field = 0
    # 0 position, 1 event_id, 2/3 type offsets/data, 4 timestamp, 5 recorded_at, 6 tag offsets,
    # 7/8 key offsets/data, 9/10 value offsets/data, 11/12 metadata, 13/14 data, 15 hash
    # Every row takes at least its 2-byte field count, so no more than this many can be in
    # ``rows``: buffers are sized for them, whatever ``count`` says (later rows are cut short).
    if count < 0:
        raise ValueError("count must not be negative")
    cdef Py_ssize_t fit = min(count, size // 2 + 1)
    memset(bufs, 0, sizeof(bufs))
    try:
        _reserve(&bufs[0], 8 * fit)
        _reserve(&bufs[1], 16 * fit)
        _reserve(&bufs[4], 8 * fit)
        _reserve(&bufs[5], 8 * fit)
        _reserve(&bufs[15], 32 * fit)
        for k in (2, 6, 7, 9, 11, 13):
            _reserve(&bufs[k], 4 * (fit + 1))
            _append_offset(&bufs[k], 0)
        for row in range(count):
            bad_row = row
            bad_field = -1
            if at + 2 > size:
                problem = "is cut short"
                break
            fields = <int16_t>((s[at] << 8) | s[at + 1])
            if fields != EXPORT_FIELDS:
                problem = f"has {fields} fields, not {EXPORT_FIELDS}"
                break
            at += 2
            for field in range(EXPORT_FIELDS):
                bad_field = field
                if at + 4 > size:
                    problem = "is cut short"
                    break
                length = _get32(s + at)
                at += 4
                if length < 0:
                    problem = "is NULL"
                    break
                if at + length > size:
                    problem = "is cut short"
                    break
                v = s + at
                at += length
                if field == F_POSITION or field == F_TIMESTAMP or field == F_RECORDED_AT:
                    if length != 8:
                        problem = f"has {length} bytes, not 8"
                        break
                    value = _get64(v)
                    if field == F_POSITION:
                        _append(&bufs[0], <const char *>&value, 8)
                        continue
                    if not -TIME_LIMIT < value < TIME_LIMIT:
                        problem = "is not a finite time"
                        break
                    value += PG_EPOCH_US
                    _append(&bufs[4 if field == F_TIMESTAMP else 5], <const char *>&value, 8)
                elif field == F_EVENT_ID or field == F_HASH:
                    k = 16 if field == F_EVENT_ID else 32
                    if length != k:
                        problem = f"has {length} bytes, not {k}"
                        break
                    _append(&bufs[1 if field == F_EVENT_ID else 15], <const char *>v, k)
                elif field == F_EVENT_TYPE:
                    _append(&bufs[3], <const char *>v, length)
                    if bufs[3].size > MAX_OFFSET:
                        problem = "overflows a 2 GiB batch"
                        break
                    _append_offset(&bufs[2], bufs[3].size)
                else:
                    if length < 1 or v[0] != 1:
                        problem = "is not jsonb version 1"
                        break
                    if field == F_TAGS:
                        pairs = _tag_pairs_native(v + 1, length - 1, &bufs[7], &bufs[8],
                                                  &bufs[9], &bufs[10])
                        if pairs == -3:
                            problem = "overflows a 2 GiB batch"
                            break
                        if pairs < 0:
                            problem = "are not an object of strings"
                            break
                        entries += pairs
                        _append_offset(&bufs[6], entries)
                    else:
                        b = &bufs[11 if field == F_METADATA else 13]
                        _append(b + 1, <const char *>(v + 1), length - 1)
                        if b[1].size > MAX_OFFSET:
                            problem = "overflows a 2 GiB batch"
                            break
                        _append_offset(b, b[1].size)
            if problem is not None:
                break
        if problem is None and at != size:
            bad_row = count
            bad_field = -1
            problem = "follows the last expected row"
        if problem is not None:
            raise _decode_error(
                bad_row, "row" if bad_field < 0 else FIELD_NAMES[bad_field], problem
            )
        return _DecodedRows(
            count, _take(&bufs[0]), _take(&bufs[1]), _take(&bufs[2]), _take(&bufs[3]),
            _take(&bufs[4]), _take(&bufs[5]), _take(&bufs[6]), _take(&bufs[7]),
            _take(&bufs[8]), _take(&bufs[9]), _take(&bufs[10]), _take(&bufs[11]),
            _take(&bufs[12]), _take(&bufs[13]), _take(&bufs[14]), _take(&bufs[15]),
        )
    finally:
        for k in range(17):
            PyMem_Free(bufs[k].p)


# ---------------------------------------------------------------------------------------------
# reading: binary COPY rows into SequencedEvents (the reference is _pycodec.decode_events)

cdef object _reference_decode_events = _pycodec.decode_events
cdef object _decode_tags = _pycodec.decode_tags
cdef object _decode_object = _pycodec.decode_object
cdef tuple _DECODE_FAILURES = _pycodec._DECODE_FAILURES
cdef Py_ssize_t EVENT_FIELDS = len(_pycodec.EVENT_COLUMNS)
cdef object _object_new = object.__new__
cdef object _object_setattr = object.__setattr__
cdef object _SAFE_UNKNOWN = uuid.SafeUUID.unknown
# Whether a UUID is made as `tamma_events.model` makes one from its int, without its
# constructor's argument parsing (see model._uuid_fast); otherwise by the constructor.
cdef bint UUID_FAST = _model._uuid_from_int is _model._uuid_fast
# The range of Python's datetime, in microseconds since 2000-01-01 UTC: 0001-01-01 to
# 9999-12-31T23:59:59.999999.
cdef int64_t MIN_TIME_US = -730119 * 86400 * <int64_t>1000000
cdef int64_t MAX_TIME_US = (2921940 * 86400 * <int64_t>1000000) - 1
# Days from 1970-01-01 to 2000-01-01.
cdef int64_t PG_EPOCH_DAYS = 10957

# The keywords SequencedEvent is called with after its six positional fields.
cdef tuple _EVENT_KEYWORDS = ("position", "recorded_at", "hash")


cdef extern from "Python.h":
    object PyObject_Vectorcall(object callable, PyObject **args, size_t nargsf, object kwnames)
    void PyObject_GC_UnTrack(void *op)


# Field numbers of EVENT_COLUMNS.
cdef enum:
    E_POSITION = 0
    E_HASH = 1
    E_EVENT_ID = 2
    E_EVENT_TYPE = 3
    E_TIMESTAMP = 4
    E_RECORDED_AT = 5
    E_TAGS = 6
    E_METADATA = 7
    E_DATA = 8


cdef object _time_of(int64_t micros):
    """The UTC datetime ``micros`` after 2000-01-01 (in Python's range: the caller checks)."""
    cdef int64_t days = micros // 86400000000
    cdef int64_t rest = micros - days * 86400000000
    if rest < 0:  # floor division, whatever the division's semantics
        days -= 1
        rest += 86400000000
    cdef int64_t z, era, doe, yoe, y, doy, mp, d, m
    # Howard Hinnant's civil_from_days, from days since 1970-01-01.
    z = days + PG_EPOCH_DAYS + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    return datetime_new(y, m, d, rest // 3600000000, (rest // 60000000) % 60,
                        (rest // 1000000) % 60, rest % 1000000, _UTC)


cdef object _uuid_of(const unsigned char *b):
    cdef object value = ((PyLong_FromUnsignedLongLong(<uint64_t>_get64(b)) << 64)
                         | PyLong_FromUnsignedLongLong(<uint64_t>_get64(b + 8)))
    cdef object made
    if not UUID_FAST:
        return _UUID(int=value)
    made = _object_new(_UUID)
    _object_setattr(made, "int", value)
    _object_setattr(made, "is_safe", _SAFE_UNKNOWN)
    # A UUID holds an int and an enum member and cannot be changed: it can never be part of a
    # reference cycle, so the cycle collector need not look at it (as CPython does for tuples
    # of atomic values). Pages of events then leave it nothing to traverse but their dicts
    # that hold containers (SequencedEvent itself is gc=False).
    PyObject_GC_UnTrack(<PyObject *>made)
    return made


def decode_events(rows, Py_ssize_t count):
    """Decode ``count`` binary COPY rows of the read columns into `SequencedEvent`s (an
    archived event's row into its position): see `tamma_events.codec.reference.decode_events`,
    which this matches event for event and error for error (a row it cannot take is handed to
    the reference, which words the error)."""
    cdef const unsigned char[::1] view = memoryview(rows).cast("B")
    cdef const unsigned char *s = &view[0] if view.shape[0] else NULL
    cdef Py_ssize_t size = view.shape[0]
    cdef Py_ssize_t at = 0, row, field, length
    cdef Py_ssize_t starts[9]
    cdef Py_ssize_t lengths[9]
    cdef int64_t moment
    cdef bint bad = False, archived
    cdef list events
    cdef object event_type, tags, metadata, data, timestamp, recorded_at, event_id, position
    cdef object digest
    cdef PyObject *args[9]
    if count < 0:
        raise ValueError("count must not be negative")
    events = []
    for row in range(count):
        if at + 2 > size or <int16_t>((s[at] << 8) | s[at + 1]) != EVENT_FIELDS:
            bad = True
            break
        at += 2
        archived = False
        for field in range(EVENT_FIELDS):
            if at + 4 > size:
                bad = True
                break
            length = _get32(s + at)
            at += 4
            if length < 0:
                if field == E_HASH:
                    archived = True
                elif not archived:
                    bad = True
                    break
                continue
            if at + length > size:
                bad = True
                break
            if archived:  # only framed
                at += length
                continue
            starts[field] = at
            lengths[field] = length
            at += length
            if field == E_POSITION or field == E_TIMESTAMP or field == E_RECORDED_AT:
                if length != 8:
                    bad = True
                    break
            elif field == E_EVENT_ID:
                if length != 16:
                    bad = True
                    break
            elif field == E_HASH:
                if length != HASH_SIZE:
                    bad = True
                    break
            elif field >= E_TAGS:
                if length < 1 or s[at - length] != 1:
                    bad = True
                    break
        if bad:
            break
        if archived:
            events.append(_get64(s + starts[E_POSITION]))
            continue
        moment = _get64(s + starts[E_TIMESTAMP])
        if not MIN_TIME_US <= moment <= MAX_TIME_US:
            bad = True
            break
        timestamp = _time_of(moment)
        moment = _get64(s + starts[E_RECORDED_AT])
        if not MIN_TIME_US <= moment <= MAX_TIME_US:
            bad = True
            break
        recorded_at = _time_of(moment)
        try:
            event_type = PyUnicode_DecodeUTF8(<const char *>s + starts[E_EVENT_TYPE],
                                              lengths[E_EVENT_TYPE], NULL)
            tags = _decode_tags(PyBytes_FromStringAndSize(
                <const char *>s + starts[E_TAGS] + 1, lengths[E_TAGS] - 1))
            metadata = _decode_object(PyBytes_FromStringAndSize(
                <const char *>s + starts[E_METADATA] + 1, lengths[E_METADATA] - 1))
            data = _decode_object(PyBytes_FromStringAndSize(
                <const char *>s + starts[E_DATA] + 1, lengths[E_DATA] - 1))
        except _DECODE_FAILURES:
            bad = True
            break
        event_id = _uuid_of(s + starts[E_EVENT_ID])
        position = _get64(s + starts[E_POSITION])
        digest = PyBytes_FromStringAndSize(<const char *>s + starts[E_HASH], HASH_SIZE)
        # SequencedEvent(event_type, data, tags, metadata, event_id, timestamp,
        # position=, recorded_at=, hash=) by vectorcall: no dict for the keywords.
        args[0] = <PyObject *>event_type
        args[1] = <PyObject *>data
        args[2] = <PyObject *>tags
        args[3] = <PyObject *>metadata
        args[4] = <PyObject *>event_id
        args[5] = <PyObject *>timestamp
        args[6] = <PyObject *>position
        args[7] = <PyObject *>recorded_at
        args[8] = <PyObject *>digest
        events.append(PyObject_Vectorcall(_SequencedEvent, args, 6, _EVENT_KEYWORDS))
    if not bad and at != size:
        bad = True
    if bad:
        _reference_decode_events(rows, count)
        raise AssertionError("the native decoder rejected rows that the reference accepts")
    return events


# ---------------------------------------------------------------------------------------------
# reading COPY TO data straight from libpq (see tamma_events.ops.libpq)

ctypedef int (*get_copy_data_t)(void *conn, char **buffer, int async_) noexcept nogil
ctypedef void (*freemem_t)(void *ptr) noexcept nogil

cdef bytes COPY_HEADER = _pycodec.COPY_HEADER
cdef const char *COPY_SIGNATURE = COPY_HEADER


cdef enum:
    READ_WOULD_BLOCK = 1
    READ_MORE = 0
    READ_END = -1
    READ_FAILED = -2
    READ_BAD_HEADER = -3
    READ_NO_MEMORY = -4


cdef struct CopyReader:
    get_copy_data_t get
    freemem_t free_
    void *pgconn
    int async_
    bint first
    char *p
    Py_ssize_t size
    Py_ssize_t cap
    Py_ssize_t count


cdef int _read_rows(CopyReader *r, Py_ssize_t max_rows, Py_ssize_t max_bytes) noexcept nogil:
    """Read rows into ``r`` until ``max_rows`` rows or ``max_bytes`` bytes, or the end (or,
    in libpq's async mode, until no whole row is buffered): all without the GIL, so that a
    thread reading ahead does not wait for it at every row."""
    cdef char *message = NULL
    cdef char *grown
    cdef int n
    cdef Py_ssize_t skip, cap
    while r.count < max_rows and r.size < max_bytes:
        n = r.get(r.pgconn, &message, r.async_)
        if n == 0:
            return READ_WOULD_BLOCK
        if n < 0:
            return READ_FAILED if n == -2 else READ_END
        skip = 0
        if r.first:
            r.first = False
            if n < 19 or memcmp(message, COPY_SIGNATURE, 19) != 0:
                r.free_(message)
                return READ_BAD_HEADER
            skip = 19
        if (n - skip == 2 and <unsigned char>message[skip] == 0xFF
                and <unsigned char>message[skip + 1] == 0xFF):
            r.free_(message)
            continue
        if n > skip:
            if r.size + n - skip > r.cap:
                cap = r.cap * 2 if r.cap else 1 << 16
                while cap < r.size + n - skip:
                    cap *= 2
                grown = <char *>realloc(r.p, cap)
                if grown == NULL:
                    r.free_(message)
                    return READ_NO_MEMORY
                r.p = grown
                r.cap = cap
            memcpy(r.p + r.size, message + skip, n - skip)
            r.size += n - skip
            r.count += 1
        r.free_(message)
    return READ_MORE


def read_copy(size_t conn, size_t get_copy_data, size_t freemem, Py_ssize_t max_rows,
              Py_ssize_t max_bytes, bint first, bint nonblocking=False):
    """Read the rows of a ``COPY ... TO STDOUT (FORMAT BINARY)`` in progress on the libpq
    connection ``conn`` (a ``PGconn *``), with libpq's own ``PQgetCopyData`` and ``PQfreemem``
    (their addresses), without the GIL for the whole read: at most ``max_rows`` rows, stopping
    once ``max_bytes`` are read. ``first``: the next message starts with the file header,
    which is checked and dropped; the trailer is dropped too.

    With ``nonblocking``, only the rows libpq has already received are read (its async mode:
    the caller waits for the socket and calls ``PQconsumeInput`` when the status is 1).

    Returns ``(rows, count, status)``: the rows back to back, how many, and 0 when more may
    follow, 1 when no whole row is buffered (``nonblocking`` only), -1 at the end of the
    data, -2 when libpq failed (its caller reads the error)."""
    cdef CopyReader reader
    cdef int status
    memset(&reader, 0, sizeof(reader))
    reader.get = <get_copy_data_t>get_copy_data
    reader.free_ = <freemem_t>freemem
    reader.pgconn = <void *>conn
    reader.first = first
    reader.async_ = 1 if nonblocking else 0
    try:
        with nogil:
            status = _read_rows(&reader, max_rows, max_bytes)
        if status == READ_BAD_HEADER:
            raise _EventStoreError("STORAGE_ERROR", "the export's COPY header is not valid")
        if status == READ_NO_MEMORY:
            raise MemoryError()
        return PyBytes_FromStringAndSize(reader.p, reader.size), reader.count, status
    finally:
        free(reader.p)


# ---------------------------------------------------------------------------------------------
# verifying: the hash chain recomputed over rows read back (the reference is _pycodec.rehash)

cdef object _Rehashed = _pycodec.Rehashed
cdef object _stored_row_error = _pycodec.stored_row_error
cdef object _stored_json_error = _pycodec.stored_json_error
cdef object _read_stored_json = _pycodec.read_stored_json
cdef object _decode_json = msgspec.json.Decoder().decode
cdef object _MsgspecError = msgspec.MsgspecError
cdef tuple STORED_NAMES = _pycodec.COPY_COLUMNS
# Field numbers of COPY_COLUMNS.
cdef enum:
    S_POSITION = 0
    S_EVENT_ID = 1
    S_EVENT_TYPE = 2
    S_TIMESTAMP = 3
    S_TAGS = 4
    S_METADATA = 5
    S_DATA = 6
    S_HASH = 7
    S_FIELDS = 8


# ---------------------------------------------------------------------------------------------
# verifying, natively: jsonb's text rewritten as the codec encodes it, without Python objects

cdef extern from "Python.h":
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0
    char *PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int *type) except NULL
    int Py_DTSF_ADD_DOT_0

# The longest number text read natively, and the most digits of an integer read natively (the
# codec's limit, 4,096 bits, has 1,234): past them, the msgspec path (and the reference's
# rules) decide.
cdef enum:
    MAX_NUMBER_TEXT = 320
    MAX_INT_DIGITS = 1200
    # What an object's values may be: any JSON (metadata, data), or strings (tags).
    ANY_VALUES = 0
    STRING_VALUES = 1


cdef const char *HEX_DIGITS = b"0123456789abcdef"


cdef struct Member:
    Py_ssize_t key_at     # the key's unescaped UTF-8, in Canon.keys
    Py_ssize_t key_len
    Py_ssize_t text_at    # the member's canonical text ("key":value), in Canon.out
    Py_ssize_t text_len


cdef struct Canon:
    Buf out       # the canonical text being written
    Buf keys      # the unescaped keys of the objects being read (and one string's, briefly)
    Buf tmp       # scratch: one object's members, in order
    Buf members   # Member records of the objects being read
    Buf merge     # scratch for sorting them


cdef void _canon_free(Canon *c) noexcept:
    PyMem_Free(c.out.p)
    PyMem_Free(c.keys.p)
    PyMem_Free(c.tmp.p)
    PyMem_Free(c.members.p)
    PyMem_Free(c.merge.p)


cdef inline int _key_cmp(const char *keys, const Member *a, const Member *b) noexcept nogil:
    cdef Py_ssize_t n = a.key_len if a.key_len < b.key_len else b.key_len
    cdef int r = memcmp(keys + a.key_at, keys + b.key_at, n)
    if r != 0:
        return r
    return (a.key_len > b.key_len) - (a.key_len < b.key_len)


cdef int _sort_members(Canon *c, Py_ssize_t first, Py_ssize_t count) except -2:
    """Sort the ``count`` member records from ``first`` by key, as Python orders strings (by
    code point, which their UTF-8 bytes order alike): a bottom-up merge sort. -1 when two keys
    are equal (jsonb has no duplicates; such text takes the msgspec path)."""
    cdef Member *m
    cdef Member *t
    cdef Py_ssize_t width = 1, lo, mid, hi, i, j, k
    cdef int r
    if count < 2:
        return 0
    _reserve(&c.merge, count * <Py_ssize_t>sizeof(Member))
    m = (<Member *>c.members.p) + first
    t = <Member *>c.merge.p
    while width < count:
        lo = 0
        while lo < count:
            mid = min(lo + width, count)
            hi = min(lo + 2 * width, count)
            i = lo
            j = mid
            k = lo
            while i < mid and j < hi:
                r = _key_cmp(c.keys.p, &m[i], &m[j])
                if r == 0:
                    return -1
                if r < 0:
                    t[k] = m[i]
                    i += 1
                else:
                    t[k] = m[j]
                    j += 1
                k += 1
            while i < mid:
                t[k] = m[i]
                i += 1
                k += 1
            while j < hi:
                t[k] = m[j]
                j += 1
                k += 1
            lo = hi
        memcpy(m, t, count * sizeof(Member))
        width *= 2
    return 0


cdef Py_ssize_t _canon_string(Canon *c, const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                              bint keep, Py_ssize_t *chars) except -2:
    """Read the JSON string at ``s[i]`` (its opening quote) and write it to ``c.out`` as msgspec
    writes strings (``\\"``, ``\\\\``, ``\\b \\t \\n \\f \\r``, ``\\u00xx`` for the other control
    characters, everything else as UTF-8). Its UTF-8 is left at the end of ``c.keys`` when
    ``keep``; ``chars`` gets its length in code points. The index after it; -1 for text the
    codec refuses or that is malformed (invalid UTF-8, a NUL, a lone surrogate)."""
    cdef Py_ssize_t start = c.keys.size, k, plain, ulen, count = 0, j = i + 1
    cdef const unsigned char *u
    cdef unsigned char b, high = 0
    cdef char esc[6]
    # Most strings have nothing escaped: their text is their UTF-8, which msgspec writes as
    # it is. Those are copied whole.
    while j < n:
        b = s[j]
        if b == c'"' or b == c'\\' or b < 0x20:
            break
        high |= b
        count += (b & 0xC0) != 0x80
        j += 1
    if j < n and s[j] == c'"':
        u = s + i + 1
        ulen = j - i - 1
        if high >= 0x80 and not _utf8_ok(u, ulen):
            return -1
        _append(&c.out, <const char *>s + i, ulen + 2)
        if keep:
            _append(&c.keys, <const char *>u, ulen)
        chars[0] = count
        return j + 1
    count = 0
    i = _json_string(s, i, n, &c.keys)
    if i < 0:
        c.keys.size = start
        return -1
    u = <const unsigned char *>c.keys.p + start
    ulen = c.keys.size - start
    if memchr(u, 0, ulen) != NULL or not _utf8_ok(u, ulen):
        c.keys.size = start
        return -1
    _append(&c.out, b'"', 1)
    plain = 0
    for k in range(ulen):
        b = u[k]
        if b & 0xC0 != 0x80:
            count += 1
        if b != c'"' and b != c'\\' and b >= 0x20:
            continue
        _append(&c.out, <const char *>u + plain, k - plain)
        plain = k + 1
        esc[0] = c'\\'
        if b == c'"' or b == c'\\':
            esc[1] = <char>b
        elif b == 0x08:
            esc[1] = c'b'
        elif b == 0x09:
            esc[1] = c't'
        elif b == 0x0A:
            esc[1] = c'n'
        elif b == 0x0C:
            esc[1] = c'f'
        elif b == 0x0D:
            esc[1] = c'r'
        else:
            esc[1] = c'u'
            esc[2] = c'0'
            esc[3] = c'0'
            esc[4] = HEX_DIGITS[b >> 4]
            esc[5] = HEX_DIGITS[b & 15]
            _append(&c.out, esc, 6)
            continue
        _append(&c.out, esc, 2)
    _append(&c.out, <const char *>u + plain, ulen - plain)
    _append(&c.out, b'"', 1)
    if not keep:
        c.keys.size = start
    chars[0] = count
    return i


cdef inline bint _digit(unsigned char b) noexcept nogil:
    return c'0' <= b <= c'9'


cdef bint _short_float(Canon *c, const unsigned char *s, Py_ssize_t start, Py_ssize_t point,
                       Py_ssize_t end, bint negative) except -1:
    """Write the decimal ``s[start:end]`` (digits, the point at ``point``) as msgspec writes the
    float nearest to it, when it has at most 15 significant digits and a magnitude from 1e-300
    to below 1e16; False otherwise (and nothing is written).

    Two decimals of 15 significant digits or fewer never round to the same double (10**15 <
    2**53), so the shortest text that reads back as that double has exactly the decimal's
    digits, its trailing zeros dropped: no conversion is needed. msgspec writes x = d.ddd *
    10**e in full for -5 <= e <= 15 (1.0, 0.00001, 123.45) and as d.ddde<e> otherwise."""
    cdef char digits[16]
    cdef Py_ssize_t count = 0, k, power, exponent = 0, last = 0
    cdef char text[48]
    cdef int n
    cdef unsigned char b
    for k in range(start, end):
        b = s[k]
        if b == c'.':
            continue
        power = point - k - 1 if k < point else point - k
        if count == 0:
            if b == c'0':
                continue
            exponent = power
        if count == 15:
            if b != c'0':
                return False
            continue
        digits[count] = <char>b
        count += 1
        if b != c'0':
            last = count
    if count == 0:
        _append(&c.out, b"0.0", 3)
        return True
    count = last  # the trailing zeros dropped
    if exponent > 15 or exponent < -300:
        # 1e16 and more are stored as integers; near the subnormals doubles have fewer
        # digits than 15: both for the conversions below.
        return False
    if negative:
        _append(&c.out, b"-", 1)
    if exponent < -5:
        _append(&c.out, digits, 1)
        if count > 1:
            _append(&c.out, b".", 1)
            _append(&c.out, digits + 1, count - 1)
        n = snprintf(text, sizeof(text), b"e%ld", <long>exponent)
        _append(&c.out, text, n)
    elif exponent < 0:
        _append(&c.out, b"0.", 2)
        for k in range(-exponent - 1):
            _append(&c.out, b"0", 1)
        _append(&c.out, digits, count)
    else:
        if count > exponent + 1:
            _append(&c.out, digits, exponent + 1)
            _append(&c.out, b".", 1)
            _append(&c.out, digits + exponent + 1, count - exponent - 1)
        else:
            _append(&c.out, digits, count)
            for k in range(exponent + 1 - count):
                _append(&c.out, b"0", 1)
            _append(&c.out, b".0", 2)
    return True


cdef Py_ssize_t _canon_number(Canon *c, const unsigned char *s, Py_ssize_t i,
                              Py_ssize_t n) except -2:
    """Read the JSON number at ``s[i]`` and write it as the codec encodes what msgspec decodes
    from it: an integer as its digits ("-0" as 0); a fraction as a float, in msgspec's shortest
    form (0.0 for zeros). -1 for anything else (an exponent, which jsonb never prints, a float
    of 1e16 or more, which the codec stores as an integer, or text too long): the msgspec path
    takes those."""
    cdef Py_ssize_t j = i, int_end, k
    cdef bint negative = False, fraction = False
    cdef char text[MAX_NUMBER_TEXT + 1]
    cdef char *end
    cdef char *shortest
    cdef char *e
    cdef double x
    cdef long exponent
    cdef char digits[24]
    if j < n and s[j] == c'-':
        negative = True
        j += 1
    if j >= n or not _digit(s[j]):
        return -1
    if s[j] == c'0':
        j += 1
        if j < n and _digit(s[j]):
            return -1
    else:
        while j < n and _digit(s[j]):
            j += 1
    int_end = j
    if j < n and s[j] == c'.':
        j += 1
        if j >= n or not _digit(s[j]):
            return -1
        while j < n and _digit(s[j]):
            j += 1
        fraction = True
    if j < n and (s[j] == c'e' or s[j] == c'E'):
        return -1
    if not fraction:
        if int_end - i - negative > MAX_INT_DIGITS:
            return -1
        if int_end - i - negative == 1 and s[int_end - 1] == c'0':
            _append(&c.out, b"0", 1)
        else:
            _append(&c.out, <const char *>s + i, int_end - i)
        return j
    if _short_float(c, s, i + negative, int_end, j, negative):
        return j
    if j - i > MAX_NUMBER_TEXT:
        return -1
    memcpy(text, s + i, j - i)
    text[j - i] = 0
    x = PyOS_string_to_double(text, &end, NULL)
    if end != text + (j - i) or not isfinite(x) or fabs(x) >= FLOAT_EXPONENT_FROM:
        return -1
    if x == 0.0:
        _append(&c.out, b"0.0", 3)
        return j
    shortest = PyOS_double_to_string(x, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        e = strchr(shortest, c'e')
        if e == NULL:
            _append(&c.out, shortest, strlen(shortest))
            return j
        exponent = strtol(e + 1, NULL, 10)
        if exponent == -5:
            # msgspec writes 1e-05 as 0.00001: the digits after "0.0000".
            if shortest[0] == c'-':
                _append(&c.out, b"-", 1)
            _append(&c.out, b"0.0000", 6)
            for k in range((1 if shortest[0] == c'-' else 0), e - shortest):
                if shortest[k] != c'.':
                    _append(&c.out, shortest + k, 1)
            return j
        # msgspec writes the exponent bare: 1e-7, 2.5e-300.
        _append(&c.out, shortest, e - shortest)
        k = snprintf(digits, sizeof(digits), b"e%ld", exponent)
        _append(&c.out, digits, k)
        return j
    finally:
        PyMem_Free(shortest)


cdef Py_ssize_t _canon_object(Canon *c, const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                              int depth, int values) except -2:
    """Read the JSON object at ``s[i]`` and write it with its keys sorted, no spaces; -1 for
    anything the msgspec path is to judge (see `_canon_value`). With ``STRING_VALUES``, as tags:
    string values only, keys of 1 to MAX_TAG_KEY_LENGTH code points."""
    cdef Py_ssize_t first = c.members.size // sizeof(Member), count = 0, k, chars = 0
    cdef Py_ssize_t keys_at = c.keys.size, at = c.out.size
    cdef Member m
    cdef Member *sorted_
    if depth > MAX_DEPTH:
        return -1
    i = _skip_space(s, i + 1, n)
    if i < n and s[i] == c'}':
        _append(&c.out, b"{}", 2)
        return i + 1
    while True:
        if i >= n or s[i] != c'"':
            return -1
        m.text_at = c.out.size
        m.key_at = c.keys.size
        i = _canon_string(c, s, i, n, True, &chars)
        if i < 0:
            return -1
        m.key_len = c.keys.size - m.key_at
        if values == STRING_VALUES and not 1 <= chars <= MAX_TAG_KEY_LENGTH:
            return -1
        i = _skip_space(s, i, n)
        if i >= n or s[i] != c':':
            return -1
        _append(&c.out, b":", 1)
        i = _skip_space(s, i + 1, n)
        if values == STRING_VALUES:
            if i >= n or s[i] != c'"':
                return -1
            i = _canon_string(c, s, i, n, False, &chars)
        else:
            i = _canon_value(c, s, i, n, depth + 1)
        if i < 0:
            return -1
        m.text_len = c.out.size - m.text_at
        _append(&c.members, <const char *>&m, sizeof(Member))
        count += 1
        i = _skip_space(s, i, n)
        if i < n and s[i] == c',':
            i = _skip_space(s, i + 1, n)
            continue
        if i < n and s[i] == c'}':
            i += 1
            break
        return -1
    if _sort_members(c, first, count) < 0:
        return -1
    sorted_ = (<Member *>c.members.p) + first
    c.tmp.size = 0
    _append(&c.tmp, b"{", 1)
    for k in range(count):
        if k:
            _append(&c.tmp, b",", 1)
        _append(&c.tmp, c.out.p + sorted_[k].text_at, sorted_[k].text_len)
    _append(&c.tmp, b"}", 1)
    c.out.size = at
    _append(&c.out, c.tmp.p, c.tmp.size)
    c.members.size = first * sizeof(Member)
    c.keys.size = keys_at
    return i


cdef Py_ssize_t _canon_value(Canon *c, const unsigned char *s, Py_ssize_t i, Py_ssize_t n,
                             int depth) except -2:
    """Read the JSON value at ``s[i]`` (jsonb's text: spaces after ``:`` and ``,``, keys in
    jsonb's order) and write it to ``c.out`` as the codec encodes what msgspec decodes from it
    (`tamma_events.codec.reference.canonical`, then msgspec with sorted keys). -1 for anything
    that is not plain (a rule the codec enforces broken, an exponent, a float past 1e16, ...):
    the caller then takes the msgspec path, which judges it as the reference does."""
    cdef Py_ssize_t chars
    cdef unsigned char b
    if i >= n:
        return -1
    b = s[i]
    if b == c'{':
        return _canon_object(c, s, i, n, depth, ANY_VALUES)
    if b == c'[':
        if depth > MAX_DEPTH:
            return -1
        _append(&c.out, b"[", 1)
        i = _skip_space(s, i + 1, n)
        if i < n and s[i] == c']':
            _append(&c.out, b"]", 1)
            return i + 1
        while True:
            i = _canon_value(c, s, i, n, depth + 1)
            if i < 0:
                return -1
            i = _skip_space(s, i, n)
            if i < n and s[i] == c',':
                _append(&c.out, b",", 1)
                i = _skip_space(s, i + 1, n)
                continue
            if i < n and s[i] == c']':
                _append(&c.out, b"]", 1)
                return i + 1
            return -1
    if b == c'"':
        return _canon_string(c, s, i, n, False, &chars)
    if b == c'-' or _digit(b):
        return _canon_number(c, s, i, n)
    if n - i >= 4 and memcmp(s + i, b"true", 4) == 0:
        _append(&c.out, b"true", 4)
        return i + 4
    if n - i >= 5 and memcmp(s + i, b"false", 5) == 0:
        _append(&c.out, b"false", 5)
        return i + 5
    if n - i >= 4 and memcmp(s + i, b"null", 4) == 0:
        _append(&c.out, b"null", 4)
        return i + 4
    return -1


cdef bint _canon_field(Canon *c, const unsigned char *s, Py_ssize_t n, int values) except -1:
    """Write the canonical text of one stored jsonb field (its text ``s``, an object) to
    ``c.out``; False when the msgspec path is to take it."""
    cdef Py_ssize_t i = _skip_space(s, 0, n)
    if i >= n or s[i] != c'{':
        return False
    i = _canon_object(c, s, i, n, 1, values)
    return i >= 0 and _skip_space(s, i, n) == n


def canonical_json(text, bint tags=False):
    """The canonical JSON of one stored jsonb field's text (an object), as `rehash` writes it
    natively, or None when that text takes the msgspec path; see
    `tamma_events.codec.reference.canonical_json`."""
    cdef const unsigned char[::1] view = memoryview(text).cast("B")
    cdef Canon canon
    memset(&canon, 0, sizeof(canon))
    try:
        if not _canon_field(&canon, &view[0] if view.shape[0] else <const unsigned char *>b"",
                            view.shape[0], STRING_VALUES if tags else ANY_VALUES):
            return None
        return PyBytes_FromStringAndSize(canon.out.p, canon.out.size)
    finally:
        _canon_free(&canon)


cdef Py_ssize_t _rehash_rows(Canon *c, const unsigned char *data, const Py_ssize_t *spans,
                             Py_ssize_t limit, void *ctx, const unsigned char **prev) except -2:
    """Hash the first ``limit`` rows, their JSON rewritten natively (`_canon_field`), from
    ``prev[0]``, which is left at the last matching hash. Returns the first row whose hash does
    not match, ``limit`` when all do, or -1 when a row's JSON is for the msgspec path (then the
    caller starts the chunk over that way)."""
    cdef Py_ssize_t row, i, k, prefix, start
    cdef Py_ssize_t ends[3]
    cdef unsigned char digest[32]
    cdef const unsigned char *stored
    for row in range(limit):
        i = row * (2 * S_FIELDS + 1)
        c.out.size = 0
        for k in range(3):
            if not _canon_field(c, data + spans[i + 2 * (S_TAGS + k)] + 1,
                                spans[i + 2 * (S_TAGS + k) + 1] - 1,
                                STRING_VALUES if k == 0 else ANY_VALUES):
                return -1
            ends[k] = c.out.size
        # The row as the append encoded it: field count through timestamp as stored, then the
        # three jsonb fields anew.
        prefix = spans[i + 2 * S_TAGS] - 4 - spans[i + 2 * S_FIELDS]
        c.tmp.size = 0
        _append(&c.tmp, <const char *>data + spans[i + 2 * S_FIELDS], prefix)
        start = 0
        for k in range(3):
            _reserve(&c.tmp, 5)
            _put32(c.tmp.p + c.tmp.size, <uint32_t>(ends[k] - start + 1))
            c.tmp.p[c.tmp.size + 4] = 1
            c.tmp.size += 5
            _append(&c.tmp, c.out.p + start, ends[k] - start)
            start = ends[k]
        if ctx != NULL:
            if not tamma_sha256_2(ctx, prev[0], HASH_SIZE, <const unsigned char *>c.tmp.p,
                                  c.tmp.size, digest):
                raise RuntimeError("libcrypto failed to compute SHA-256")
        else:
            memcpy(digest, PyBytes_AS_STRING(
                _sha256(PyBytes_FromStringAndSize(<const char *>prev[0], HASH_SIZE)
                        + PyBytes_FromStringAndSize(c.tmp.p, c.tmp.size)).digest()), HASH_SIZE)
        stored = data + spans[i + 2 * S_HASH]
        if memcmp(digest, stored, HASH_SIZE) != 0:
            return row
        prev[0] = stored
    return limit


def rehash(rows, Py_ssize_t count, int64_t first_position, bytes prev_hash):
    """Recompute the hash chain over stored rows; see `tamma_events.codec.reference.rehash`.

    The rows are cut natively, and each row's jsonb text is rewritten natively as the codec
    encodes it (keys sorted, msgspec's forms of strings and numbers), put back together and
    hashed, with no Python object per row. When a row's JSON is anything but plain (a rule of
    the codec broken, duplicate keys, an exponent, a float of 1e16 or more), the chunk takes
    the msgspec path instead: its JSON decoded by one msgspec call and encoded again by
    another, which words whatever is wrong as the reference does."""
    cdef const unsigned char[::1] view = rows
    cdef const unsigned char *data = &view[0] if view.shape[0] else <const unsigned char *>b""
    cdef Py_ssize_t size = view.shape[0]
    cdef Py_ssize_t *spans = NULL      # per row: S_FIELDS (start, length) pairs, then the row start
    cdef Py_ssize_t *json_spans = NULL
    cdef Py_ssize_t at = 0, row, k, length, i, limit, total, n, text_size
    cdef Py_ssize_t expected_size
    cdef int16_t fields
    cdef unsigned char *scratch = NULL
    cdef Py_ssize_t scratch_cap = 0, row_size, prefix
    cdef unsigned char digest[32]
    cdef const unsigned char *prev
    cdef char *p
    cdef void *ctx = NULL
    cdef str kind = ""
    cdef str detail = ""
    cdef object problem, decoded, values, metadata, payload, encoded, hashed_prev
    cdef bytearray joined
    cdef const char *json_text
    cdef Canon canon
    if len(prev_hash) != HASH_SIZE:
        raise ValueError("prev_hash must be 32 bytes")
    if count < 0:
        raise ValueError("count must not be negative")
    if count == 0:
        if size:
            raise _stored_row_error(0, "row", "follows the last expected row")
        return _Rehashed(0, prev_hash)
    # Every row takes at least its 2-byte field count: the rows are cut short before any span
    # past this many is written, whatever ``count`` says.
    cdef Py_ssize_t fit = min(count, size // 2 + 1)
    spans = <Py_ssize_t *>PyMem_Malloc(fit * (2 * S_FIELDS + 1) * sizeof(Py_ssize_t))
    json_spans = <Py_ssize_t *>PyMem_Malloc(6 * fit * sizeof(Py_ssize_t))
    if spans == NULL or json_spans == NULL:
        PyMem_Free(spans); PyMem_Free(json_spans)
        raise MemoryError()
    try:
        # Cut the rows, checking their framing as the reference does.
        for row in range(count):
            if at + 2 > size:
                raise _stored_row_error(row, "row", "is cut short")
            fields = <int16_t>((data[at] << 8) | data[at + 1])
            if fields != S_FIELDS:
                raise _stored_row_error(row, "row", f"has {fields} fields, not {S_FIELDS}")
            spans[row * (2 * S_FIELDS + 1) + 2 * S_FIELDS] = at
            at += 2
            for k in range(S_FIELDS):
                if at + 4 > size:
                    raise _stored_row_error(row, STORED_NAMES[k], "is cut short")
                length = _get32(data + at)
                at += 4
                if length < 0:
                    raise _stored_row_error(row, STORED_NAMES[k], "is NULL")
                if at + length > size:
                    raise _stored_row_error(row, STORED_NAMES[k], "is cut short")
                expected_size = (8 if k == S_POSITION or k == S_TIMESTAMP else
                                 16 if k == S_EVENT_ID else HASH_SIZE if k == S_HASH else -1)
                if expected_size >= 0 and length != expected_size:
                    raise _stored_row_error(row, STORED_NAMES[k],
                                            f"has {length} bytes, not {expected_size}")
                if S_TAGS <= k <= S_DATA and (length < 1 or data[at] != 1):
                    raise _stored_row_error(row, STORED_NAMES[k], "is not jsonb version 1")
                spans[row * (2 * S_FIELDS + 1) + 2 * k] = at
                spans[row * (2 * S_FIELDS + 1) + 2 * k + 1] = length
                at += length
        if at != size:
            raise _stored_row_error(count, "row", "follows the last expected row")

        # Positions: the chain can only be checked up to the first one out of place.
        limit = count
        for row in range(count):
            if _get64(data + spans[row * (2 * S_FIELDS + 1) + 2 * S_POSITION]) != first_position + row:
                limit = row
                kind = "missing"
                detail = str(_get64(data + spans[row * (2 * S_FIELDS + 1) + 2 * S_POSITION]))
                break

        # Natively first: each row's JSON rewritten as the codec writes it, and hashed. A row
        # whose JSON is not plain sends the chunk down the msgspec path below, from its start.
        if limit:
            if HAVE_LIBCRYPTO:
                ctx = tamma_sha256_ctx_new()
                if ctx == NULL:
                    raise MemoryError()
            prev = <const unsigned char *>PyBytes_AS_STRING(prev_hash)
            memset(&canon, 0, sizeof(canon))
            try:
                row = _rehash_rows(&canon, data, spans, limit, ctx, &prev)
            finally:
                _canon_free(&canon)
            if row >= 0:
                if row < limit:
                    return _Rehashed(row, PyBytes_FromStringAndSize(<const char *>prev, HASH_SIZE),
                                     row, "hash")
                hashed_prev = PyBytes_FromStringAndSize(<const char *>prev, HASH_SIZE)
                if kind:
                    return _Rehashed(limit, hashed_prev, limit, kind, detail)
                return _Rehashed(count, hashed_prev)

        # The JSON of every row up to there, decoded by one call: "[t, t, t, ...]".
        values = []
        if limit:
            total = 2
            for row in range(limit):
                for k in range(S_TAGS, S_DATA + 1):
                    total += spans[row * (2 * S_FIELDS + 1) + 2 * k + 1]  # text + a separator
            joined = PyByteArray_FromStringAndSize(NULL, total)
            p = PyByteArray_AS_STRING(joined)
            p[0] = b'['
            n = 1
            for row in range(limit):
                for k in range(S_TAGS, S_DATA + 1):
                    length = spans[row * (2 * S_FIELDS + 1) + 2 * k + 1] - 1
                    memcpy(p + n, data + spans[row * (2 * S_FIELDS + 1) + 2 * k] + 1, length)
                    n += length
                    p[n] = b','
                    n += 1
            p[n - 1] = b']'
            # Each value must be exactly its field's text, or the array could decode with the
            # right count but the values shifted (one field "1,2", the next two "[3" and "4]"):
            # the top-level spans of the array must be the fields' own.
            values = None
            if _split_elements(p, n, json_spans, 3 * limit) == 3 * limit:
                at = 1
                for k in range(3 * limit):
                    length = spans[(k // 3) * (2 * S_FIELDS + 1) + 2 * (S_TAGS + k % 3) + 1] - 1
                    if json_spans[2 * k] != at or json_spans[2 * k + 1] != at + length:
                        break
                    at += length + 1
                else:
                    try:
                        values = _decode_json(memoryview(joined)[:n])
                    except (_MsgspecError, ValueError, RecursionError):  # invalid UTF-8, depth
                        values = None
            if values is None or len(values) != 3 * limit:
                # Find the first value that cannot be read, worded by the reference.
                values = []
                for row in range(limit):
                    for k in range(S_TAGS, S_DATA + 1):
                        at = spans[row * (2 * S_FIELDS + 1) + 2 * k]
                        length = spans[row * (2 * S_FIELDS + 1) + 2 * k + 1]
                        decoded, problem = _read_stored_json(
                            PyBytes_FromStringAndSize(<const char *>data + at + 1, length - 1))
                        if problem is not None:
                            limit, kind, detail = row, "encode", problem
                            break
                        values.append(decoded)
                    if kind == "encode":
                        break
                del values[3 * limit:]
            # The codec's rules on each row's JSON; metadata and data as they are encoded.
            for row in range(limit):
                metadata = _json_object(values[3 * row + 1])
                payload = _json_object(values[3 * row + 2])
                if not _tags_ok(values[3 * row]) or metadata is None or payload is None:
                    problem = _stored_json_error(values[3 * row], values[3 * row + 1],
                                                 values[3 * row + 2], row)
                    if problem is None:
                        raise AssertionError(
                            f"the native codec rejected stored row {row} but the reference "
                            "accepts it")
                    limit, kind, detail = row, "encode", problem
                    break
                values[3 * row + 1] = metadata
                values[3 * row + 2] = payload
            del values[3 * limit:]

        prev = <const unsigned char *>PyBytes_AS_STRING(prev_hash)
        hashed_prev = prev_hash
        if limit:
            encoded = _encode(values)
            json_text = PyBytes_AS_STRING(encoded)
            text_size = PyBytes_GET_SIZE(encoded)
            if _split_elements(json_text, text_size, json_spans, 3 * limit) != 3 * limit:
                raise AssertionError("could not split the encoded JSON of the stored rows")
            if HAVE_LIBCRYPTO and ctx == NULL:
                ctx = tamma_sha256_ctx_new()
                if ctx == NULL:
                    raise MemoryError()
            for row in range(limit):
                # Field count through timestamp as stored, then the three JSON fields anew.
                i = row * (2 * S_FIELDS + 1)
                prefix = spans[i + 2 * S_TAGS] - 4 - spans[i + 2 * S_FIELDS]
                row_size = prefix
                for k in range(3 * row, 3 * row + 3):
                    row_size += 5 + json_spans[2 * k + 1] - json_spans[2 * k]
                if row_size > scratch_cap:
                    PyMem_Free(scratch)
                    scratch_cap = row_size * 2
                    scratch = <unsigned char *>PyMem_Malloc(scratch_cap)
                    if scratch == NULL:
                        raise MemoryError()
                memcpy(scratch, data + spans[i + 2 * S_FIELDS], prefix)
                _put_json_fields(<char *>scratch + prefix, json_text, json_spans, 3 * row)
                if ctx != NULL:
                    if not tamma_sha256_2(ctx, prev, HASH_SIZE, scratch, row_size, digest):
                        raise RuntimeError("libcrypto failed to compute SHA-256")
                else:
                    memcpy(digest, PyBytes_AS_STRING(
                        _sha256(PyBytes_FromStringAndSize(<const char *>prev, HASH_SIZE)
                                + PyBytes_FromStringAndSize(<const char *>scratch, row_size)
                                ).digest()), HASH_SIZE)
                if memcmp(digest, data + spans[i + 2 * S_HASH], HASH_SIZE) != 0:
                    return _Rehashed(row, PyBytes_FromStringAndSize(<const char *>prev, HASH_SIZE),
                                     row, "hash")
                prev = data + spans[i + 2 * S_HASH]
            hashed_prev = PyBytes_FromStringAndSize(<const char *>prev, HASH_SIZE)
        if kind:
            return _Rehashed(limit, hashed_prev, limit, kind, detail)
        return _Rehashed(count, hashed_prev)
    finally:
        if ctx != NULL:
            tamma_sha256_ctx_free(ctx)
        PyMem_Free(spans)
        PyMem_Free(json_spans)
        PyMem_Free(scratch)
