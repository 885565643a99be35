"""``fedsilo certs``: the federation's CA and its members' certificates (docs/certificates.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedsilo import certs
from fedsilo.errors import ConfigError
from fedsilo.options import whole_number

app = typer.Typer(
    help="The federation's certificates: a CA run by the operator, a key and certificate per silo and for the "
    "aggregator.\n\nAcross organisations: the operator runs `init`; each site runs `request` and sends its .csr; "
    "the operator runs `sign` and sends back the .pem. `issue` makes key and certificate in one step (tests, one "
    "operator).",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)

Directory = Annotated[
    Path, typer.Option("--dir", envvar="FEDSILO_CERTS_DIR", help="Directory of the CA and the files made here.")
]
Force = Annotated[
    bool, typer.Option("--force", envvar="FEDSILO_CERTS_FORCE", help="Replace existing keys and certificates.")
]
Days = Annotated[
    int | None,
    whole_number(
        "--days",
        minimum=1,
        envvar="FEDSILO_CERTS_DAYS",
        show_default=False,
        help="Validity in days [default: 3650 for the CA, 365 for a member; never beyond the CA's].",
    ),
]
Rank = Annotated[
    int | None,
    whole_number(
        "--rank",
        envvar="FEDSILO_RANK",
        show_default=False,
        help="The silo's rank, 1..K, which the certificate binds.",
    ),
]
Role = Annotated[
    str,
    typer.Option(
        "--role", envvar="FEDSILO_CERTS_ROLE", metavar="silo|aggregator", help="Whose certificate: silo or aggregator."
    ),
]
Site = Annotated[
    str | None,
    typer.Option(
        "--site",
        envvar="FEDSILO_CERTS_SITE",
        metavar="TEXT",
        show_default=False,
        help="The organisation running this member (the subject's O), e.g. a hospital's name.",
    ),
]
Hosts = Annotated[
    list[str] | None,
    typer.Option(
        "--host",
        envvar="FEDSILO_CERTS_HOSTS",
        metavar="HOST",
        show_default=False,
        help="Aggregator only: a DNS name or IP address the silos dial; repeat for each (variable: space-separated).",
    ),
]
CaCert = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert",
        envvar="FEDSILO_CERTS_CA_CERT",
        show_default=False,
        help="The CA certificate [default: DIR/ca.pem].",
    ),
]
CaKey = Annotated[
    Path | None,
    typer.Option(
        "--ca-key", envvar="FEDSILO_CERTS_CA_KEY", show_default=False, help="The CA key [default: DIR/ca.key]."
    ),
]


def _role(value: str) -> certs.Role:
    for known in certs.ROLES:
        if value == known:
            return known
    raise ConfigError(f"invalid option '--role': expected silo or aggregator (got {value!r})")


def _echo(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows) + 1
    for label, value in rows:
        typer.echo(f"{label + ':':<{width}} {value}")


@app.command("init")
def init(
    directory: Directory = Path("certs"),
    name: Annotated[
        str, typer.Option("--name", envvar="FEDSILO_CERTS_CA_NAME", help="The CA's name (its subject CN).")
    ] = "fedsilo federation CA",
    days: Days = None,
    force: Force = False,
) -> None:
    """Operator: create the federation CA, DIR/ca.pem (give it to every member) and DIR/ca.key (keep it secret)."""
    cert, key = certs.init_ca(directory, name, days or certs.CA_DAYS, force=force)
    _echo([("CA certificate", str(cert)), ("CA key (secret)", str(key))])


@app.command("request")
def request(
    rank: Rank = None,
    role: Role = "silo",
    site: Site = None,
    directory: Directory = Path("certs"),
    force: Force = False,
) -> None:
    """Site: make this member's key (it stays here) and a certificate request (.csr) to send to the operator.

    Read the printed key sha256 to the operator, who checks it against the request they received.
    """
    key, csr = certs.request(directory, _role(role), rank, site, force=force)
    _echo(
        [
            ("key (secret, stays here)", str(key)),
            ("request (send to the operator)", str(csr)),
            *certs.describe(certs.load_request(csr)),
        ]
    )


@app.command("sign")
def sign(
    csr: Annotated[Path, typer.Argument(help="The site's certificate request (.csr).", show_default=False)],
    rank: Rank = None,
    role: Role = "silo",
    hosts: Hosts = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            envvar="FEDSILO_CERTS_OUT",
            show_default=False,
            help="Where to write the certificate [default: the request's path with .pem].",
        ),
    ] = None,
    directory: Directory = Path("certs"),
    ca_cert: CaCert = None,
    ca_key: CaKey = None,
    days: Days = None,
    force: Force = False,
) -> None:
    """Operator: sign a site's request with the CA. Pass --rank to have it refused unless it asks for that rank.

    Check the printed rank and key sha256 with the site before sending the certificate back.
    """
    path = certs.sign(
        csr,
        ca_cert or directory / certs.CA_CERT,
        ca_key or directory / certs.CA_KEY,
        out,
        role=_role(role),
        rank=rank,
        hosts=hosts or (),
        days=days or certs.CERT_DAYS,
        force=force,
    )
    _echo([("certificate", str(path)), *certs.describe(certs.load_certificate(path))])


@app.command("issue")
def issue(
    rank: Rank = None,
    role: Role = "silo",
    site: Site = None,
    hosts: Hosts = None,
    directory: Directory = Path("certs"),
    ca_cert: CaCert = None,
    ca_key: CaKey = None,
    days: Days = None,
    force: Force = False,
) -> None:
    """Operator: make a member's key and certificate in one step (tests, clusters with one operator).

    The key is made where the CA is; across organisations use request and sign instead.
    """
    key, cert = certs.issue(
        directory,
        ca_cert or directory / certs.CA_CERT,
        ca_key or directory / certs.CA_KEY,
        _role(role),
        rank,
        site=site,
        hosts=hosts or (),
        days=days or certs.CERT_DAYS,
        force=force,
    )
    _echo([("key (secret)", str(key)), ("certificate", str(cert)), *certs.describe(certs.load_certificate(cert))])


@app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="A certificate (.pem) or request (.csr).", show_default=False)],
) -> None:
    """Print a certificate's or request's subject, role, rank, hosts, serial, validity and key sha256."""
    _echo(certs.describe(certs.load_pem(path)))
