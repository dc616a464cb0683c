# syntax=docker/dockerfile:1
# Build: docker build -t loyalty-service .
# Run:   docker run -p 50051:50051 -e LOYALTY_DATABASE_URL=postgresql://user:pass@db:5432/loyalty loyalty-service
# Set LOYALTY_DATABASE_URL for a real deployment; without it the service starts an embedded
# PostgreSQL in the container's home directory, which is only good for a quick try.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# Dependencies first, so source changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir loyalty_service && touch loyalty_service/__init__.py \
    && pip install . && pip uninstall --yes loyalty-service \
    && pip install grpcio-tools==1.85.1
COPY protos ./protos
COPY loyalty_service ./loyalty_service
COPY migrations ./migrations
# Generated code is built here, as `make protos` does, never copied from a work tree.
RUN rm -rf loyalty_service/gen && mkdir loyalty_service/gen \
    && python -m grpc_tools.protoc -I protos \
       --python_out=loyalty_service/gen --grpc_python_out=loyalty_service/gen \
       protos/vinr/loyalty/v1/*.proto \
    && pip uninstall --yes grpcio-tools \
    && pip install --no-deps -e . \
    && python -c "import loyalty_service.server"

FROM python:3.11-slim
# Listening beyond loopback, the server needs an identity source and a policy (README
# "Callers": LOYALTY_JWT_JWKS, LOYALTY_TRUST_FORWARDED_CLIENT_CERT behind a mesh sidecar, or
# LOYALTY_TLS_*; with LOYALTY_POLICY_FILE), or LOYALTY_TRUSTED_NETWORK=true; else it exits 2.
RUN useradd --system --create-home --uid 10001 loyalty
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=root:root /app /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LOYALTY_LISTEN_ADDRESS=[::]:50051 \
    LOYALTY_DATA_DIR=/home/loyalty/.loyalty-data
WORKDIR /app
USER loyalty
EXPOSE 50051
# SIGTERM starts a graceful shutdown (LOYALTY_SHUTDOWN_GRACE seconds for in-flight calls).
STOPSIGNAL SIGTERM
ENTRYPOINT ["loyalty-service"]
CMD ["serve"]
