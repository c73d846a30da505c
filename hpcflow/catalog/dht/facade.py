"""kademlia's asyncio world in one thread, behind a small synchronous API for gevent.

The daemon is one gevent loop; kademlia 2.2 (on rpcudp) is asyncio.  A
:class:`DhtFacade` owns one native thread that runs one asyncio event loop,
and every kademlia object (the :class:`kademlia.network.Server`, its UDP
transport, its protocol and its storage) is touched only from that thread.

A call from gevent (:meth:`DhtFacade.get_many`, :meth:`set`, ...) hands a
coroutine to the loop with :func:`asyncio.run_coroutine_threadsafe` and
waits *cooperatively* on a :class:`gevent.event.Event`: the concurrent
future's done-callback (run in the asyncio thread) queues that event and
sends the facade's one libev ``async`` watcher, the thread-safe way to wake
a gevent hub; the hub sets the queued events and the waiting greenlets get
on with their answers.  Nothing ever blocks the hub on ``future.result()``;
each wait is bounded by a gevent timeout (scaled by the caller: the node
passes its ``rpc_timeout_s``), and a timed-out coroutine is cancelled in its
thread.  Several greenlets may wait at once.

Values are refused before anything is sent when their kademlia ``store``
message would be over rpcudp's 8192-byte limit
(:class:`~hpcflow.errors.CatalogValueTooLarge`).  Exceptions inside the loop
(a garbage datagram makes rpcudp's handler task fail) go to a throttled log
line, never out of the thread: the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import gevent
import gevent.event
import umsgpack
from kademlia.crawling import NodeSpiderCrawl, RPCFindResponse
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.utils import digest

from ...errors import CatalogValueTooLarge, PeerUnavailable
from ...logutil import Throttled
from .storage import PointerStorage

log = logging.getLogger("hpcflow.catalog.dht")
# kademlia logs every lookup at INFO and rpcudp every missed reply and garbage datagram:
# a peer could flood our log through them.  Failures reach us as results and as the
# loop's (throttled) exception handler instead.
logging.getLogger("kademlia").setLevel(logging.ERROR)
logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
T = TypeVar("T")

#: rpcudp refuses a request whose msgpack encoding is longer than this.
MAX_MESSAGE = 8192
#: The Kademlia replication factor and lookup parallelism.  k = 8 rather than the
#: paper's 20: a cluster's nodes are reliable machines on one network, and a lookup
#: that collects every replica's value (see :meth:`DhtFacade.get_many`) asks k nodes.
KSIZE = 8
ALPHA = 3
#: A member that did not answer is passed over by one-hop lookups for this long (it is
#: asked again after; one that sends us a request is believed at once), and at most
#: this many are remembered.
SUSPECT_S = 10.0
MAX_SUSPECTS = 1024


def member_id(rpc_endpoint: str) -> bytes:
    """The DHT node id of the member whose (advertised) RPC endpoint this is: every node
    computes every member's id from the membership, so it knows which k members are
    nearest a key without asking (:meth:`DhtFacade._targets`)."""
    return digest(f"hpcflow-dht\0{rpc_endpoint}")


def store_message_size(value: bytes) -> int:
    """Bytes of the kademlia ``store`` request that would carry ``value``."""
    return len(umsgpack.packb(["store", [b"\0" * 20, b"\0" * 20, value]]))


Addr = tuple[str, int]


class _MemberProtocol(KademliaProtocol):
    """kademlia's protocol, whose routing table admits only ``allowed`` addresses (the
    DHT nodes of live cluster members, set from the gevent side, see
    :meth:`DhtFacade.set_allowed`; None: anyone).  Stock kademlia adds whoever sends it
    a request: one forged datagram from a closed port and every lookup that asks it
    waits a whole RPC timeout, and a dead member stays until each node has timed out
    on it itself.  ``members``: those nodes with their ids, when the ids are known (the
    one-hop lookups of :meth:`DhtFacade._targets`)."""

    allowed: frozenset[Addr] | None = None
    members: tuple[Node, ...] = ()

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handing: set[asyncio.Future[Any]] = set()  # stores to a new contact
        #: Members that did not answer a request, until when one-hop lookups pass them
        #: over (the membership may list a member alive for seconds after it died, or
        #: for good if only its UDP is blocked; each lookup asking it would wait out an
        #: RPC timeout).
        self.suspects: dict[Addr, float] = {}

    def handle_call_response(self, result: Any, node: Node) -> Any:
        addr = (node.ip, node.port)
        if result[0]:
            self.suspects.pop(addr, None)
        elif len(self.suspects) < MAX_SUSPECTS:
            self.suspects[addr] = time.monotonic() + SUSPECT_S
        return super().handle_call_response(result, node)

    def admits(self, node: Node) -> bool:
        return self.allowed is None or (node.ip, node.port) in self.allowed

    def welcome_if_new(self, node: Node) -> None:
        """Add a new contact, first handing it the values it should hold (Kademlia 2.5:
        the ones it is among the k nearest to, when we are the nearest we know of).
        kademlia 2.2.3 measures those distances to ``digest(dkey)`` instead of ``dkey``,
        so a node that joined after a value was stored mostly never got it."""
        self.suspects.pop((node.ip, node.port), None)  # it speaks: not (or no longer) dead
        if not self.admits(node) or not self.router.is_new_node(node):
            return
        for dkey, value in self.storage:
            keynode = Node(dkey)
            near = self.router.find_neighbors(keynode)
            new_is_near = (len(near) < self.router.ksize
                           or node.distance_to(keynode) < near[-1].distance_to(keynode))
            we_are_nearest = (not near or self.source_node.distance_to(keynode)
                              < near[0].distance_to(keynode))
            if new_is_near and we_are_nearest:
                task = asyncio.ensure_future(self.call_store(node, dkey, value))
                self.handing.add(task)
                task.add_done_callback(self.handing.discard)
        self.router.add_contact(node)


def _admitted(protocol: _MemberProtocol, nodes: list[Node]) -> list[Node]:
    return [n for n in nodes if protocol.admits(n)]


class _NodeCrawl(NodeSpiderCrawl):
    """kademlia's node lookup, following only admitted contacts."""

    def _absorb(self, responses: dict[bytes, Any]) -> None:
        """Take one round's answers: silent nodes are dropped, values go to ``_value``,
        and the admitted contacts of the others join the nearest."""
        toremove = []
        for peerid, response in responses.items():
            found = RPCFindResponse(response)
            if not found.happened():
                toremove.append(peerid)
            elif found.has_value():
                self._value(found.get_value())
            else:
                self.nearest.push(_admitted(self.protocol, found.get_node_list()))
        self.nearest.remove(toremove)

    def _value(self, value: Any) -> None:
        """A value in an answer (a node lookup asks for none)."""

    async def _nodes_found(self, responses: dict[bytes, Any]) -> Any:
        self._absorb(responses)
        if self.nearest.have_contacted_all():
            return list(self.nearest)
        return await self.find()


class _CollectingCrawl(_NodeCrawl):
    """A value lookup that asks every one of the k nodes nearest the key and returns
    every distinct value they hold (kademlia's own ``get`` stops at the first round
    with a value and keeps the most common one: a replica that missed an update, or a
    merged index one store behind, would hide the rest)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.values: list[bytes] = []

    async def find(self) -> list[bytes]:
        await self._find(self.protocol.call_find_value)
        return self.values

    def _value(self, value: Any) -> None:
        if isinstance(value, bytes) and value not in self.values:
            self.values.append(value)

    async def _nodes_found(self, responses: dict[bytes, Any]) -> Any:
        self._absorb(responses)
        if self.nearest.have_contacted_all():
            return None
        return await self._find(self.protocol.call_find_value)


class DhtFacade:
    """One kademlia node, run in its own thread; every method is called from gevent."""

    def __init__(self, storage: PointerStorage, *, interface: str = "127.0.0.1",
                 port: int = 0, rpc_timeout_s: float = 1.0, call_timeout_s: float = 10.0,
                 ksize: int = KSIZE, alpha: int = ALPHA, node_id: bytes | None = None
                 ) -> None:
        self.storage = storage
        self.interface, self.requested_port = interface, port
        self.rpc_timeout_s, self.call_timeout_s = rpc_timeout_s, call_timeout_s
        # node_id: see member_id (None: kademlia's random id, and lookups that crawl)
        self.server = Server(ksize=ksize, alpha=alpha, storage=storage, node_id=node_id)
        self.server.protocol_class = _MemberProtocol
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self._thread: threading.Thread | None = None
        self._errors = Throttled(log)
        self._woken: collections.deque[gevent.event.Event] = collections.deque()
        self._async: Any = None
        self.stats = {"loop_errors": 0, "sets": 0, "gets": 0, "timeouts": 0}
        self._allowed_sent: tuple[dict[Addr, bytes] | None] | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the thread and bind the UDP port (``OSError`` when it is taken)."""
        self._async = gevent.get_hub().loop.async_()
        self._async.start(self._drain)
        self._thread = threading.Thread(target=self._run, name="hpcflow-dht", daemon=True)
        self._thread.start()
        self.port = self.call(self._listen(), self.call_timeout_s)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    async def _listen(self) -> int:
        await self.server.listen(self.requested_port, interface=self.interface)
        self.server.protocol._wait_timeout = self.rpc_timeout_s
        sock = self.server.transport.get_extra_info("sockname")
        return int(sock[1])

    def stop(self) -> None:
        """Close the socket and end the thread (idempotent)."""
        if self._thread is None:
            return
        thread, self._thread = self._thread, None

        def shutdown() -> None:
            self.server.stop()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.call_soon(self.loop.stop)

        if self.loop.is_running() or thread.is_alive():
            self.loop.call_soon_threadsafe(shutdown)
        # The thread ends within a loop iteration; wait for it without blocking the hub.
        deadline = time.monotonic() + 5.0
        while thread.is_alive() and time.monotonic() < deadline:
            gevent.sleep(0.01)
        self._async.close()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A failed task in the loop (rpcudp handling a garbage datagram, a store to a
        node that went away): counted and logged, never raised."""
        self.stats["loop_errors"] += 1
        exc = context.get("exception")
        self._errors.warning("dht: %s%s", context.get("message", "error"),
                             f": {type(exc).__name__}: {exc}"[:300] if exc else "")

    # -- the bridge --------------------------------------------------------------
    def _wake(self, done: gevent.event.Event) -> None:
        """From the DHT thread: have the hub set ``done``.  The only gevent call made from
        that thread is ``send()`` on one async watcher that lives as long as the facade
        (libev's thread-safe entry point), so no watcher is ever created, started or
        closed while the other thread may be signalling it."""
        self._woken.append(done)
        self._async.send()

    def _drain(self) -> None:
        """In the hub: set every event the DHT thread queued."""
        while self._woken:
            self._woken.popleft().set()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` in the DHT thread; wait for it without blocking the gevent hub."""
        if self._thread is None:
            coro.close()
            raise PeerUnavailable("the DHT is not running")
        cfut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return self._wait(cfut, self.call_timeout_s if timeout_s is None else timeout_s)

    def _wait(self, cfut: concurrent.futures.Future[T], timeout_s: float) -> T:
        done = gevent.event.Event()
        cfut.add_done_callback(lambda _f: self._wake(done))
        if not done.wait(timeout_s):
            cfut.cancel()
            self.stats["timeouts"] += 1
            raise PeerUnavailable(f"the DHT did not answer within {timeout_s:g} s")
        try:
            return cfut.result(timeout=0)
        except concurrent.futures.CancelledError:
            raise PeerUnavailable("the DHT call was cancelled") from None

    # -- kademlia operations -----------------------------------------------------
    def set(self, key: str, value: bytes, timeout_s: float | None = None) -> bool:
        """Store ``value`` under ``key`` here and on the k nodes nearest it; True when
        another node took it too."""
        self.check_size(key, value)
        self.stats["sets"] += 1
        return self.call(self._set(digest(key), value), timeout_s)

    def set_many(self, items: Iterable[tuple[str, bytes]],
                 timeout_s: float | None = None) -> int:
        """Store several values concurrently; how many another node took too."""
        pairs = [(k, v) for k, v in items]
        for k, v in pairs:
            self.check_size(k, v)
        if not pairs:
            return 0
        self.stats["sets"] += len(pairs)

        async def all_of() -> int:
            done = await asyncio.gather(*(self._set(digest(k), v) for k, v in pairs))
            return sum(bool(d) for d in done)

        return self.call(all_of(), timeout_s)

    @staticmethod
    def check_size(key: str, value: bytes) -> None:
        size = store_message_size(value)
        if size > MAX_MESSAGE:
            raise CatalogValueTooLarge(
                f"DHT value for {key[:80]!r} is {size} bytes as a kademlia message; one "
                f"message carries at most {MAX_MESSAGE} (store pointers, not data)")

    def _targets(self, dkey: bytes) -> list[Node] | None:
        """The k live members nearest ``dkey``, computed here (one hop) when their ids are
        known (:meth:`set_allowed`), else None (crawl).  Every member's id is the digest
        of its RPC endpoint (:func:`member_id`) and every node knows every live member
        (the replicated membership), so this is the very set a Kademlia lookup converges
        to, found without its rounds: a crawl of a table of ~50 contacts took 3-5
        sequential rounds of round trips per key, each waiting for other processes to
        be scheduled (172 ms p50 per ``locate`` with 256 daemons on 2 cores)."""
        protocol = self.server.protocol
        members = protocol.members
        if not members:
            return None
        if protocol.suspects:  # pass over members that did not answer lately
            now = time.monotonic()
            for addr in [a for a, t in protocol.suspects.items() if t <= now]:
                del protocol.suspects[addr]
            if protocol.suspects:
                members = tuple(n for n in members
                                if (n.ip, n.port) not in protocol.suspects)
        key = int.from_bytes(dkey, "big")
        return heapq.nsmallest(self.server.ksize, members, key=lambda n: n.long_id ^ key)

    async def _set(self, dkey: bytes, value: bytes) -> bool:
        """Store here (readable even alone; we republish our own values) and on the k
        nodes nearest ``dkey``; True when another node took it too."""
        protocol = self.server.protocol
        self.storage[dkey] = value
        node = Node(dkey)
        nodes = self._targets(dkey)
        if nodes is None:
            nearest = protocol.router.find_neighbors(node)
            if not nearest:
                return False
            nodes = await _NodeCrawl(protocol, node, nearest, self.server.ksize,
                                     self.server.alpha).find()
        results = await asyncio.gather(*(protocol.call_store(n, dkey, value) for n in nodes))
        return any(r[0] for r in results)

    def get_many(self, keys: Iterable[str], timeout_s: float | None = None
                 ) -> dict[str, list[bytes]]:
        """Every distinct value each key has on the k nodes nearest it (and here)."""
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        self.stats["gets"] += len(wanted)

        async def all_of() -> dict[str, list[bytes]]:
            found = await asyncio.gather(*(self._get(digest(k)) for k in wanted))
            return dict(zip(wanted, found, strict=True))

        return self.call(all_of(), timeout_s)

    async def _get(self, dkey: bytes) -> list[bytes]:
        protocol = self.server.protocol
        local = self.storage.get(dkey)
        values = [local] if isinstance(local, bytes) else []
        node = Node(dkey)
        targets = self._targets(dkey)
        if targets is not None:  # one round: ask the k nearest at once
            answers = await asyncio.gather(*(protocol.call_find_value(n, node)
                                             for n in targets))
            for ok, answer in answers:
                value = answer.get("value") if ok and isinstance(answer, dict) else None
                if isinstance(value, bytes) and value not in values:
                    values.append(value)
            return values
        nearest = protocol.router.find_neighbors(node)
        if nearest:
            spider = _CollectingCrawl(protocol, node, nearest, self.server.ksize,
                                      self.server.alpha)
            values += [v for v in await spider.find() if v not in values]
        return values

    def bootstrap(self, addrs: list[tuple[str, int]], timeout_s: float | None = None) -> int:
        """Join through ``addrs`` ((IP, port): kademlia takes no host names); returns
        how many contacts the routing table has afterwards."""
        async def join() -> int:
            server = self.server
            found = await asyncio.gather(*(server.bootstrap_node(a) for a in addrs))
            nodes = [n for n in found if n is not None]
            for n in nodes:
                server.protocol.welcome_if_new(n)
            if nodes:  # find our neighbours (kademlia's join: a lookup of our own id)
                await _NodeCrawl(server.protocol, server.node, nodes, server.ksize,
                                 server.alpha).find()
            return self._contacts()

        return self.call(join(), timeout_s)

    def introduce(self, addrs: list[Addr], timeout_s: float | None = None) -> list[Addr]:
        """Ping ``addrs`` and make those that answer contacts (handing each the values it
        should hold); the addresses that answered."""
        async def ping_all() -> list[Addr]:
            server = self.server
            found = await asyncio.gather(*(server.bootstrap_node(a) for a in addrs))
            for n in found:
                if n is not None:
                    server.protocol.welcome_if_new(n)
            return [a for a, n in zip(addrs, found, strict=True) if n is not None]

        return self.call(ping_all(), timeout_s)

    def set_allowed(self, addrs: dict[Addr, bytes] | None) -> None:
        """Admit only these DHT addresses to the routing table (and drop the others);
        they are given with their node ids (:func:`member_id`), so lookups and writes go
        straight to the k nearest of them (:meth:`_targets`; None or none: crawl).  The
        same map as last time is not sent again (a wake-up of the DHT thread and a pass
        over N addresses)."""
        if self._allowed_sent is not None and self._allowed_sent[0] == addrs:
            return
        self._allowed_sent = (None if addrs is None else dict(addrs),)
        allowed = None if addrs is None else frozenset(addrs)
        members = tuple(Node(i, a[0], a[1]) for a, i in (addrs or {}).items())

        def apply() -> None:
            protocol = self.server.protocol
            if protocol is None:
                return
            protocol.members = members
            if protocol.allowed == allowed:
                return
            protocol.allowed = allowed
            for bucket in protocol.router.buckets:
                for node in bucket.get_nodes() + list(bucket.replacement_nodes.values()):
                    if not protocol.admits(node):
                        bucket.remove_node(node)

        if self._thread is not None:
            self.loop.call_soon_threadsafe(apply)

    def forget(self, nodes: dict[Addr, bytes]) -> None:
        """Drop these members from the routing table: restarted runs, empty, at the same
        endpoint (so the same id).  The next contact with each then hands it the values
        it should hold, as to any new node (while it stayed a contact, it never did)."""
        def apply() -> None:
            protocol = self.server.protocol
            if protocol is not None:
                for (ip, port), node_id in nodes.items():
                    protocol.router.remove_contact(Node(node_id, ip, port))

        if self._thread is not None and nodes:
            self.loop.call_soon_threadsafe(apply)

    def resolve(self, host: str) -> str:
        """The IPv4 address of ``host`` (an IP literal is returned as it is)."""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            pass

        async def lookup() -> str:
            infos = await self.loop.getaddrinfo(host, None, family=socket.AF_INET,
                                                type=socket.SOCK_DGRAM)
            return str(infos[0][4][0])

        return self.call(lookup(), self.call_timeout_s)

    def contacts(self) -> int:
        """Nodes in the routing table."""
        async def count() -> int:
            return self._contacts()

        return self.call(count(), self.call_timeout_s)

    def _contacts(self) -> int:
        protocol = self.server.protocol
        if protocol is None:
            return 0
        return sum(len(b.nodes) for b in protocol.router.buckets)
