"""The ``xig`` command line (typer + rich)."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gateway.config import Config, ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="XIG — cross-community imaging gateway (IHE XCPD / XCA / XCA-I, Carequality).")
config_app = typer.Typer(no_args_is_help=True, help="Example and validation of configuration files.")
certs_app = typer.Typer(no_args_is_help=True, help="Test certificates (never for production).")
app.add_typer(config_app, name="config")
app.add_typer(certs_app, name="certs")

console = Console()
err = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="XIG configuration file (TOML).")]


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        err.print(f"[bold red]configuration error[/] in {exc.source}:")
        for p in exc.problems:
            err.print(f"  - {p}")
        raise typer.Exit(2) from None


def example_config_text() -> str:
    return resources.files("gateway").joinpath("example-config.toml").read_text(encoding="utf-8")


@config_app.command("example")
def config_example() -> None:
    """Print a fully commented example configuration."""
    typer.echo(example_config_text(), nl=False)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="configuration file to validate")]) -> None:
    """Validate a configuration file (syntax, types, required keys, referenced files)."""
    cfg = _load(file)
    console.print(f"[green]ok[/]: {file} — community {cfg.gateway.home_community_id}, "
                  f"listening on {cfg.server.listen}, {len(cfg.pacs)} PACS, {len(cfg.partners)} partner(s)")


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="folder to create the test PKI in")],
    host: Annotated[list[str] | None, typer.Option("--host", help="SAN of the gateway certificate")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing set")] = False,
) -> None:
    """Generate a TEST-ONLY CA, a gateway certificate (localhost/127.0.0.1) and a partner certificate."""
    from gateway.security.certs import init_certs

    try:
        certs = init_certs(directory, hosts=tuple(host or ("localhost", "127.0.0.1")), overwrite=force)
    except FileExistsError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    console.print(f"test PKI written to {certs.directory}: ca.crt, gateway.crt/.key, partner.crt/.key "
                  "([bold]test only[/])")


@app.command("serve")
def serve(config: ConfigOption,
          verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Run the gateway (HTTPS with mutual TLS) until interrupted."""
    from gateway.soap.schema import default_schemas
    from gateway.web.server import serve as run

    cfg = _load(config)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    default_schemas().warm()
    console.print(f"XIG serving community {cfg.gateway.home_community_id} on https://{cfg.server.listen}")
    run(cfg)


@app.command("demo")
def demo(
    workdir: Annotated[Path, typer.Option(help="where the demo writes its config and data")] = Path("demo-run"),
    port: Annotated[int, typer.Option(help="port to listen on (0 = any free port)")] = 8443,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve",
                                              help="keep serving after the self-check")] = True,
) -> None:
    """Start a responding gateway on the embedded default and show how to call it."""
    from gateway.demo import run_demo

    code = asyncio.run(run_demo(workdir, port, serve_after, console))
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
