# payment-service: the standard library plus kafka-python, on a slim pinned Python.
FROM python:3.11.17-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    KAFKA_BOOTSTRAP=kafka:9092 \
    SHUTDOWN_DELAY_S=3

WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && groupadd --system --gid 10001 payment \
    && useradd --system --no-create-home --uid 10001 --gid payment payment
COPY payment_service.py .

USER 10001:10001
EXPOSE 8000
# No curl in a slim image: the health check asks /health with Python itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=2)"]
CMD ["python", "payment_service.py"]
