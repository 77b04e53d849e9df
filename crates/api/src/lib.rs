//! Public HTTP request/response/error types of the ScaiBunker API.
