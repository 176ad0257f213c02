# The sandfleet application image: the gateway and the workers run from it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY common ./common
COPY gateway ./gateway
COPY workers ./workers
RUN pip install --no-cache-dir .
ENTRYPOINT ["sandfleet"]
