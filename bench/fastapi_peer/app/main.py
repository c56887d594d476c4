"""The service payment-service replaces, as a user would write it: used only as the
peer in bench/compare.py, never deployed.

The same five endpoints written the usual FastAPI way (pydantic body model,
APIRouter mounted at /payment, one module-level KafkaProducer, flush after send),
served by uvicorn with uvloop and httptools. Handlers that do no I/O are
`async def` (the fastest choice on uvicorn); the Kafka handler is a plain `def`,
so FastAPI runs it in its thread pool.

Keep its behaviour as it is: the benchmark's ratios are only comparable between
runs while the peer stays the same. Run by compare.py as
`uvicorn app.main:app` from bench/fastapi_peer/, with KAFKA_BOOTSTRAP set."""
import json
import os

from fastapi import APIRouter, FastAPI
from kafka import KafkaProducer
from pydantic import BaseModel

VERSION = "0.1.0"
KAFKA_BOOTSTRAP = os.getenv("KAFKA_BOOTSTRAP", "kafka:9092")

producer = KafkaProducer(
    bootstrap_servers=KAFKA_BOOTSTRAP,
    value_serializer=lambda v: json.dumps(v).encode("utf-8"),
    key_serializer=lambda k: k.encode("utf-8"),
)


class Payment(BaseModel):
    order_id: int
    amount_cents: int
    currency: str


app = FastAPI()
router = APIRouter(prefix="/payment")


@router.get("/health")
async def payment_health():
    return {"status": "ok"}


@router.post("/v1/payments/create-intent")
async def create_intent(p: Payment):
    return {"payment_id": f"pay_{p.order_id}", "client_secret": f"secret_{p.order_id}"}


@router.post("/v1/payments/mock-succeed")
def mock_succeed(p: Payment):
    future = producer.send(
        "payment.events",
        key=str(p.order_id),
        value={"type": "payment.succeeded", "order_id": p.order_id,
               "amount_cents": p.amount_cents, "currency": p.currency},
    )
    producer.flush()
    future.get(timeout=10)
    return {"status": "ok"}


app.include_router(router)


@app.get("/health")
async def health():
    return {"status": "ok"}


@app.get("/v1/_info")
async def info():
    return {"service": "payment", "version": VERSION}
