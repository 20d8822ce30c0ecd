"""What a party keeps in its state directory, named once.

A node's and a coordinator's state directories hold files that several modules (and the
operator, and the demo, and the tests) must agree on: the ledger the agent charges is the one
`fedseek budget` reads, the API key `fedseek serve` writes is the one the operator hands out.
Every such path is a property here, so a file is renamed or moved in one place, and
`paths()` lists what a state directory may contain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CoordinatorLayout", "NodeLayout"]


class _Layout:
    root: Path

    def paths(self) -> dict[str, Path]:
        """Every file and directory of this layout, by property name."""
        names = [n for n, v in vars(type(self)).items() if isinstance(v, property)]
        return {n: getattr(self, n) for n in names}


@dataclass(frozen=True)
class NodeLayout(_Layout):
    """A site's state directory (`NodeConfig.state_dir`, or `fedseek serve --state`)."""

    root: Path

    @property
    def audit(self) -> Path:
        """The hash-chained audit trail's active segment (its head, checkpoint, tree, node store and lock
        sit beside it: `privacy.audit.companion_paths`; sealed segments in `audit.jsonl.segments/`)."""
        return self.root / "audit.jsonl"

    @property
    def ledger(self) -> Path:
        """The privacy ledger: every epsilon this site's data has spent."""
        return self.root / "ledger.sqlite"

    @property
    def agent_token(self) -> Path:
        """The secret the local ClientApp presents on the agent's /internal routes (0600)."""
        return self.root / "agent.token"

    @property
    def api_key(self) -> Path:
        """The first API key, created on first start for the operator to hand out (0600)."""
        return self.root / "api-key"

    @property
    def site_secret(self) -> Path:
        """32 random bytes made on first start (0600): the key of prompt digests and of stored
        explanations (node.site_keys). Back it up apart from the audit trail."""
        return self.root / "site.key"

    @property
    def kek(self) -> Path:
        """`kek.json`: the id of the key-encryption key this site's encrypted files are under, and the
        salt a passphrase KEK is derived with (federation.security.at_rest). No key is in it."""
        return self.root / "kek.json"

    @property
    def audit_payload_keys(self) -> Path:
        """At a site with a KEK: one data key a month (each wrapped by the KEK) that seals the audit
        records' sensitive fields (`privacy.audit_payload`); deleting one erases that month's fields."""
        return self.root / "audit.jsonl.keys"

    @property
    def api_key_digests(self) -> Path:
        """The API keys, one JSON record a line: SHA-256 digest (never the key), id, scopes, expiry,
        revocation (`node.api_keys`; `fedseek key create|list|revoke`)."""
        return self.root / "api-keys.sha256"

    @property
    def api_keys_lock(self) -> Path:
        """Locked (`flock`) while the keys file changes, so a `fedseek key create` and a revoke never
        lose each other's line (`node.api_keys.ApiKeys.lock_path`)."""
        return self.root / "api-keys.sha256.lock"

    @property
    def access_policy(self) -> Path:
        """Who may call which route and model of this site (`node.policy`, casbin's CSV format),
        written with a safe default on first start; edits apply without a restart and are audited."""
        return self.root / "access-policy.csv"

    @property
    def adapters(self) -> Path:
        """Deployed global adapter versions, one directory each, restored on restart."""
        return self.root / "adapters"

    @property
    def explanations(self) -> Path:
        """Stored explanation reports (JSON, HTML, PNG), served back by id."""
        return self.root / "explanations"

    @property
    def sidecar(self) -> Path:
        """The mTLS fleet sidecar's working directory (its config and log)."""
        return self.root / "sidecar"

    @property
    def sockets(self) -> Path:
        """0700, the agent's user's: the Unix sockets between the host and the private network
        namespace of the SuperNode and app guard (`federation.ops.netns`), where no TCP port is."""
        return self.root / "sockets"

    @property
    def fleet_socket(self) -> Path:
        """The fleet sidecar's `[supernode]` service (TLS, site certificate), the SuperNode's way out."""
        return self.sockets / "fleet.sock"

    @property
    def relay_socket(self) -> Path:
        """Plain HTTP between the fleet sidecar's two services, `[supernode]` to `[fleet]`."""
        return self.sockets / "relay.sock"

    @property
    def agent_socket(self) -> Path:
        """The agent's HTTPS API as the namespace reaches it (the ClientApp's `/internal` calls)."""
        return self.sockets / "agent.sock"

    @property
    def runtime_socket(self) -> Path:
        """The SuperNode's Runtime API, served by its namespace launcher: up means ready, and
        `netns.run_inside` joins the namespace through it."""
        return self.sockets / "supernode.sock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def supernode_log(self) -> Path:
        return self.logs / "supernode.log"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the site's SuperNode."""
        return self.root / "flwr"

    @property
    def superexec_secret(self) -> Path:
        """The secret the SuperNode asks of whoever takes its tasks: only the app guard holds it (0600, new
        at every start)."""
        return self.root / "superexec.secret"

    @property
    def app_guard_home(self) -> Path:
        """FLWR_HOME of the app guard: each verified app bundle is unpacked below it for one task, then removed."""
        return self.root / "app-guard"

    @property
    def app_guard_log(self) -> Path:
        return self.logs / "app-guard.log"

    @property
    def endpoints(self) -> Path:
        """`node.json`: the running agent's addresses and pid; removed when it stops."""
        return self.root / "node.json"


@dataclass(frozen=True)
class CoordinatorLayout(_Layout):
    """The coordinator's state directory (`CoordinatorConfig.state_dir`)."""

    root: Path

    @property
    def audit(self) -> Path:
        """Site joins and leaves, admin calls and every refused connection."""
        return self.root / "audit.jsonl"

    @property
    def registry(self) -> Path:
        """Global adapter versions and run summaries (`coordinator.registry.AdapterRegistry`)."""
        return self.root / "registry"

    @property
    def superlink_db(self) -> Path:
        return self.root / "superlink.db"

    @property
    def witness(self) -> Path:
        """Every site's accepted signed statements (ledger heads, audit checkpoints), per site and kind
        (`coordinator.witness.WitnessStore`): what a site told the consortium and cannot take back."""
        return self.root / "witness"

    @property
    def gateway(self) -> Path:
        """The nginx fleet gateway's working directory (config, site bindings, access and error logs)."""
        return self.root / "gateway"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def superlink_log(self) -> Path:
        return self.logs / "superlink.log"

    @property
    def control(self) -> Path:
        """0700, the coordinator user's own: the one way into the SuperLink, which listens only
        inside its private network namespace (`federation.ops.netns`)."""
        return self.root / "control"

    @property
    def superlink_socket(self) -> Path:
        """The SuperLink's port as a Unix socket (0600): the fleet gateway's upstream."""
        return self.control / "superlink.sock"

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of the SuperLink process."""
        return self.root / "flwr"

    @property
    def signed_app(self) -> Path:
        """FedSeek's Flower app signed with the consortium's app-publisher key (`fedseek app sign`): what
        `fedseek run` submits, and all that sites accept."""
        return self.root / "app"

    @property
    def flwr_cli(self) -> Path:
        """FLWR_HOME of the operator's `flwr` commands: a config naming the Control API as seen
        inside the SuperLink's network namespace, where those commands run."""
        return self.root / "flwr-cli"

    @property
    def endpoints(self) -> Path:
        """`coordinator.json`: the running coordinator's addresses, registry and pid; removed when it stops."""
        return self.root / "coordinator.json"
