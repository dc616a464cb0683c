"""OpenTelemetry set-up: a span per RPC, exported where the settings say."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from .config import Settings


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each unary call in a span named after its method, with its status code."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        tracer = self.tracer

        async def traced(request: object, context: grpc.aio.ServicerContext) -> object:
            with tracer.start_as_current_span(
                details.method, kind=trace.SpanKind.SERVER, record_exception=False
            ) as span:
                span.set_attribute("rpc.system", "grpc")
                try:
                    return await inner(request, context)
                finally:
                    code = context.code() or grpc.StatusCode.OK
                    span.set_attribute("rpc.grpc.status_code", code.value[0])

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    """Tracing costs time on every call, so it is on only when an exporter is configured."""
    if not settings.trace_console:
        return []
    provider = TracerProvider(resource=Resource.create({"service.name": "loyalty-service"}))
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    return [TracingInterceptor(provider.get_tracer("loyalty_service"))]
