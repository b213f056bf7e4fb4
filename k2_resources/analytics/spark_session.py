"""The process' Spark session, whose Iceberg catalog is K2's catalog, so Spark reads and writes K2's tables.

The jars Spark needs (``iceberg-spark-runtime``, the AWS bundle for S3, the SQLite JDBC driver)
are resolved by Maven from ``infra/spark/pom.xml`` at first use and the classpath is cached
under ``K2_HOME/spark``. The catalog is registered under the pyiceberg catalog's own name:

- the embedded catalog (pyiceberg ``SqlCatalog``) becomes Iceberg's ``JdbcCatalog`` over the same
  database (both keep tables in ``iceberg_tables`` keyed by catalog name, so the names must agree);
- a REST catalog becomes ``type=rest`` with the same URI, warehouse, credential and S3 settings.

A session is slow to start (seconds), so there is one per process, shared by every resource.
Free of Dagster: :class:`k2_resources.analytics.spark.SparkResource` wraps it for the assets.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pyiceberg.catalog import load_catalog

from k2_resources.catalog.settings import catalog_properties
from k2_resources.errors import K2Error
from k2_resources.paths import PROJECT_ROOT, state_dir
from k2_resources.platform.maven import maven_classpath

POM = PROJECT_ROOT / "infra" / "spark" / "pom.xml"
SPARK_LINE = "4.0"  # must match the iceberg-spark-runtime-<line>_2.13 artifact in POM
DEFAULT_MASTER = "local[2]"

# pyiceberg property -> Iceberg (Java) catalog property, for the S3 and REST settings both understand.
_PASS_THROUGH = {
    "warehouse": "warehouse",
    "credential": "credential",
    "token": "token",
    "scope": "scope",
    "oauth2-server-uri": "oauth2-server-uri",
    "prefix": "prefix",
    "s3.endpoint": "s3.endpoint",
    "s3.access-key-id": "s3.access-key-id",
    "s3.secret-access-key": "s3.secret-access-key",
    "s3.session-token": "s3.session-token",
    "s3.path-style-access": "s3.path-style-access",
    "s3.region": "client.region",
    "client.region": "client.region",
}

_lock = threading.Lock()
_session: Any = None  # pyspark.sql.SparkSession (pyspark is the optional `spark` extra, imported on first use)
_session_catalogs: dict[str, dict[str, str]] = {}


def _jdbc_url(sqlalchemy_uri: str) -> tuple[str, dict[str, str]]:
    """The JDBC URL (and user/password properties) of a pyiceberg SqlCatalog's SQLAlchemy URI."""
    parts = urlsplit(sqlalchemy_uri)
    dialect = parts.scheme.split("+")[0]
    if dialect == "sqlite":
        # sqlite:////abs/path.db -> path "//abs/path.db"; sqlite:///rel.db -> "/rel.db"
        path = unquote(parts.path)
        path = path[1:] if path.startswith("//") else path.lstrip("/")
        return f"jdbc:sqlite:{path}", {}
    if dialect in ("postgresql", "postgres"):
        url = f"jdbc:postgresql://{parts.hostname}:{parts.port or 5432}{parts.path}"
        extra = {}
        if parts.username:
            extra["jdbc.user"] = unquote(parts.username)
        if parts.password:
            extra["jdbc.password"] = unquote(parts.password)
        return url, extra
    raise K2Error(
        f"Spark cannot open the SQL catalog {dialect!r} ({sqlalchemy_uri.split('@')[-1]}); "
        "use SQLite or PostgreSQL for the SQL catalog, or a REST catalog (K2_ICEBERG_CATALOG_TYPE=rest)"
    )


def spark_catalog_conf(name: str, properties: dict[str, str]) -> dict[str, str]:
    """Spark settings registering K2's catalog (pyiceberg ``properties``) as Spark catalog ``name``."""
    prefix = f"spark.sql.catalog.{name}"
    # No table cache: pyiceberg commits from other processes, and Spark must read the snapshot K2 pins.
    conf = {prefix: "org.apache.iceberg.spark.SparkCatalog", f"{prefix}.cache-enabled": "false"}
    kind = properties.get("type", "sql" if properties.get("uri", "").startswith(("sqlite", "postgres")) else "rest")
    if kind == "sql":
        url, extra = _jdbc_url(properties["uri"])
        conf[f"{prefix}.catalog-impl"] = "org.apache.iceberg.jdbc.JdbcCatalog"
        # pyiceberg creates the catalog tables (spark_session loads the catalog first). Iceberg's own check
        # leaves a metadata result set open on SQLite, whose read lock then makes every pyiceberg commit fail
        # with "database is locked".
        conf[f"{prefix}.jdbc.init-catalog-tables"] = "false"
        conf[f"{prefix}.uri"] = url
        conf.update({f"{prefix}.{key}": value for key, value in extra.items()})
    elif kind == "rest":
        conf[f"{prefix}.type"] = "rest"
        conf[f"{prefix}.uri"] = properties["uri"]
    else:
        raise K2Error(f"Spark cannot use a {kind!r} catalog from K2's settings; use the SQL (JDBC) or REST catalog")
    for source, target in _PASS_THROUGH.items():
        if source in properties:
            conf[f"{prefix}.{target}"] = properties[source]
    warehouse = properties.get("warehouse", "")
    if warehouse.startswith(("s3://", "s3a://")) or any(key.startswith("s3.") for key in properties):
        conf[f"{prefix}.io-impl"] = "org.apache.iceberg.aws.s3.S3FileIO"
        conf.setdefault(f"{prefix}.client.region", "us-east-1")  # S3-compatible stores ignore it; the SDK needs one
    return conf


def spark_jars(cache_dir: Path | None = None) -> list[str]:
    """The jar files of infra/spark/pom.xml, resolved by Maven once and cached (classpath.txt under K2_HOME/spark)."""
    cache_dir = cache_dir or state_dir("spark")
    cached = cache_dir / "classpath.txt"
    classpath = maven_classpath(POM, cached, "the Iceberg jars for Spark")
    jars = [jar for jar in classpath.split(os.pathsep) if jar]
    missing = [jar for jar in jars if not Path(jar).exists()]
    if missing:
        cached.unlink()
        return spark_jars(cache_dir)
    return jars


def _require_pyspark() -> Any:
    try:
        import pyspark
    except ImportError as exc:
        raise K2Error(
            "pyspark is not installed; install K2 with the `spark` extra "
            "(`uv sync --extra spark`, or `pip install 'k2[spark]'`)"
        ) from exc
    if not pyspark.__version__.startswith(SPARK_LINE + "."):
        raise K2Error(
            f"pyspark {pyspark.__version__} does not match the Iceberg runtime for Spark {SPARK_LINE} "
            f"in infra/spark/pom.xml; install pyspark {SPARK_LINE}.x (the `spark` extra pins it)"
        )
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise K2Error(
            "Java was not found (no `java` on PATH, no JAVA_HOME); Spark needs Java 17 or newer "
            "(Debian: `apt-get install openjdk-17-jre-headless`)"
        )
    return pyspark


def spark_session(
    master: str = DEFAULT_MASTER,
    catalog_name: str = "k2",
    properties: dict[str, str] | None = None,
    driver_memory: str = "1g",
    shuffle_partitions: int = 4,
) -> Any:
    """The process' Spark session, with K2's catalog (``properties``: pyiceberg's; default: K2's settings)
    registered as ``catalog_name``. Started on first call (seconds), then reused (``master`` and the
    driver settings of the first call win)."""
    global _session
    properties = catalog_properties(properties)
    conf = spark_catalog_conf(catalog_name, properties)
    if conf.get(f"spark.sql.catalog.{catalog_name}.catalog-impl", "").endswith("JdbcCatalog"):
        load_catalog(catalog_name, **properties)  # creates the SQL catalog's tables if they are missing
    with _lock:
        if _session is not None and _session.sparkContext._jsc is not None:
            known = _session_catalogs.get(catalog_name)
            if known is None:
                for key, value in conf.items():
                    _session.conf.set(key, value)
                _session_catalogs[catalog_name] = conf
            elif known != conf:
                raise K2Error(
                    f"this process' Spark session already has catalog {catalog_name!r} at "
                    f"{known.get(f'spark.sql.catalog.{catalog_name}.uri')}; Spark keeps a catalog for the "
                    "session's life, so use one K2 catalog per process (or another catalog name)"
                )
            return _session
        _require_pyspark()
        from pyspark.sql import SparkSession

        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # bind the driver to loopback, not the host name

        builder = (
            SparkSession.builder.master(master)
            .appName("k2")
            .config("spark.jars", ",".join(spark_jars()))
            .config("spark.sql.extensions", "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.driver.memory", driver_memory)
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
            .config("spark.log.level", "WARN")
        )
        for key, value in conf.items():
            builder = builder.config(key, value)
        try:
            _session = builder.getOrCreate()
        except Exception as exc:  # the JVM did not start: say why in one line
            raise K2Error(
                f"Spark could not start ({master}): {str(exc).strip().splitlines()[0]}; "
                "check Java 17+ and K2_SPARK_MASTER"
            ) from exc
        _session_catalogs.clear()
        _session_catalogs[catalog_name] = conf
        return _session


def stop_spark() -> None:
    """Stop the process' Spark session (and its JVM's work), if one was started."""
    global _session
    with _lock:
        if _session is not None:
            _session.stop()
        _session = None
        _session_catalogs.clear()
