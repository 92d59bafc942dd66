"""The Open Inference Protocol over gRPC: the protocol's proto, its generated modules
(``make grpc`` regenerates them), the message conversions and the server."""
