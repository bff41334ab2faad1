# stream-cps: slim, non-root, runs `stream-cps run`. Only the runtime package is copied: the
# development tooling (stream_cps_dev, the `demo` extra with its embedded PostgreSQL) stays out.
# Configure with STREAM_CPS_* variables or a mounted --config file (docs/configuration.md).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream_cps ./stream_cps
COPY schemas ./schemas
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home streamcps
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER streamcps
ENTRYPOINT ["stream-cps"]
CMD ["run"]
