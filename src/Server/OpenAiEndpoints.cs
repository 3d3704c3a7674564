using System.Buffers;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using LocalVllm.Engine;
using LocalVllm.Engine.Text.Templating;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;

namespace LocalVllm.Server;

/// <summary>A request the server refuses: the status and OpenAI error fields it answers with.</summary>
internal sealed class ApiException(int status, string message, string type = "invalid_request_error", string? param = null) : Exception(message)
{
    public int Status { get; } = status;
    public string Type { get; } = type;
    public string? Param { get; } = param;
}

/// <summary>
/// The OpenAI-compatible endpoints, with vLLM's request and response shapes: chat completions (through the same
/// <see cref="LocalVllmChatClient"/> in-process apps use, so templates, tool calls and reasoning behave alike),
/// completions (straight on the engine), models, health, tokenize and detokenize. Errors use OpenAI's error JSON.
/// </summary>
internal sealed partial class OpenAiEndpoints(ILocalVllmEngine chat, LocalVllmEngine? engine, ServerOptions options, ILogger logger)
{
    private readonly LocalVllmChatClient _chat = new(chat, logger);

    /// <summary>The in-process engine for what the chat seam does not cover (completions, tokenizer endpoints, logprob tokens).</summary>
    private LocalVllmEngine Real => engine ?? throw new ApiException(501, "This server's engine serves chat completions only.", "not_implemented");
    private readonly long _started = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
    private static readonly JsonSerializerOptions Compact = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private string ModelName => chat.ModelId;

    public void Map(WebApplication app)
    {
        app.Use(async (ctx, next) =>
        {
            if (options.ApiKey is { } key && RequiresKey(ctx.Request.Path)
                && ctx.Request.Headers.Authorization.ToString() != "Bearer " + key)
            {
                await WriteError(ctx, new ApiException(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.", "authentication_error"));
                return;
            }
            try
            {
                await next(ctx);
            }
            catch (Exception e) when (!ctx.Response.HasStarted && e is not OperationCanceledException)
            {
                await WriteError(ctx, Classify(e));
            }
            catch (Exception e) when (ctx.Response.ContentType == "text/event-stream" && !ctx.RequestAborted.IsCancellationRequested)
            {
                // A stream that fails after its first event (the engine failed the request, or its deadline passed) ends
                // with an error event and [DONE], as vLLM's do, instead of a connection cut mid-response.
                var error = e is OperationCanceledException ? new ApiException(500, "The request was cancelled by the server.", "internal_server_error") : Classify(e);
                await Event(ctx, new JsonObject { ["error"] = new JsonObject { ["message"] = error.Message, ["type"] = error.Type, ["param"] = error.Param, ["code"] = error.Status } });
                await ctx.Response.WriteAsync("data: [DONE]\n\n");
            }
        });
        app.MapGet("/health", () => Results.Ok());
        app.MapMethods("/ping", ["GET", "POST"], () => Results.Ok()); // vLLM's (SageMaker's) health probe
        app.MapGet("/version", () => Results.Json(new { version = Version }));
        app.MapGet("/v1/models", ListModels);
        if (options.AllowRuntimeLoraUpdating)
        {
            app.MapPost("/v1/load_lora_adapter", LoadLoraAdapter);
            app.MapPost("/v1/unload_lora_adapter", UnloadLoraAdapter);
        }
        app.MapPost("/v1/chat/completions", ChatCompletions);
        app.MapPost("/v1/completions", Completions);
        app.MapPost("/v1/embeddings", Embeddings);
        foreach (var path in new[] { "/v1/score", "/score" }) app.MapPost(path, Score);
        foreach (var path in new[] { "/v1/rerank", "/rerank", "/v2/rerank" }) app.MapPost(path, Rerank);
        app.MapPost("/v1/responses", Responses);
        app.MapGet("/v1/responses/{id}", StoredResponse);
        app.MapMethods("/v1/responses/{id}/{action}", ["GET", "POST", "DELETE"], StoredResponse);
        app.MapDelete("/v1/responses/{id}", StoredResponse);
        app.MapPost("/tokenize", Tokenize);
        app.MapPost("/detokenize", Detokenize);
    }

    /// <summary>The server's version (GET /version, as vLLM's): the package's informational version.</summary>
    internal static string Version { get; } =
        System.Reflection.CustomAttributeExtensions.GetCustomAttribute<System.Reflection.AssemblyInformationalVersionAttribute>(typeof(OpenAiEndpoints).Assembly)?.InformationalVersion ?? "unknown";

    private static bool RequiresKey(PathString path) =>
        path.StartsWithSegments("/v1") || path.StartsWithSegments("/v2") || path.StartsWithSegments("/tokenize") || path.StartsWithSegments("/detokenize")
        || path.StartsWithSegments("/score") || path.StartsWithSegments("/rerank");

    /// <summary>What the client did wrong, or what the server could not do, as a status and message.</summary>
    private ApiException Classify(Exception e)
    {
        switch (e)
        {
            case ApiException api: return api;
            case System.Threading.Channels.ChannelClosedException { InnerException: { } inner }: return Classify(inner); // a merged stream's failure
            case EngineOverloadedException: return new ApiException(429, e.Message, "server_overloaded");
            case BadHttpRequestException bad: return new ApiException(bad.StatusCode, bad.Message); // e.g. 413 for a body over the limit
            case JsonException: return new ApiException(400, $"The request body is not valid JSON: {e.Message}");
            case ArgumentException or NotSupportedException or FormatException or TemplateException or TemplateRaisedException: return new ApiException(400, e.Message);
            default:
                logger.LogError(e, "Request failed");
                return new ApiException(500, $"Internal error: {e.Message}", "internal_server_error");
        }
    }

    private static async Task WriteError(HttpContext ctx, ApiException e)
    {
        ctx.Response.StatusCode = e.Status;
        if (e.Status == 429) ctx.Response.Headers.RetryAfter = "1";
        ctx.Response.ContentType = "application/json";
        var body = new JsonObject
        {
            ["error"] = new JsonObject { ["message"] = e.Message, ["type"] = e.Type, ["param"] = e.Param, ["code"] = e.Status },
        };
        await ctx.Response.WriteAsync(body.ToJsonString(Compact));
    }

    private static async Task<JsonObject> ReadBody(HttpContext ctx)
    {
        JsonNode? node;
        try
        {
            node = await JsonNode.ParseAsync(ctx.Request.Body, cancellationToken: ctx.RequestAborted);
        }
        catch (JsonException e)
        {
            throw new ApiException(400, $"The request body is not valid JSON: {e.Message}");
        }
        return node as JsonObject ?? throw new ApiException(400, "The request body must be a JSON object.");
    }

    /// <summary>
    /// The body's <c>model</c>: the served model (or none named) gives null, a LoRA adapter's name (--lora-modules) gives
    /// that adapter, anything else is a 404 naming what is served.
    /// </summary>
    private LoraRequest? CheckModel(JsonObject body)
    {
        if (body["model"] is not JsonValue m || m.GetValueKind() != JsonValueKind.String || m.GetValue<string>() == ModelName) return null;
        var name = m.GetValue<string>();
        return Adapters.FirstOrDefault(a => a.Name == name) ?? throw new ApiException(404,
            $"The model '{name}' does not exist; this server serves '{ModelName}'" + (Adapters.Count > 0 ? $" and the LoRA adapters {string.Join(", ", Adapters.Select(a => $"'{a.Name}'"))}." : "."),
            "NotFoundError", "model");
    }

    private IReadOnlyList<LoraRequest> Adapters => engine?.LoraModules ?? [];

    /// <summary>vLLM's runtime adapter loading: <c>{"lora_name": ..., "lora_path": ...}</c>; a bad adapter is a 400 naming what does not fit.</summary>
    private async Task LoadLoraAdapter(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        string Field(string name) => body[name] is JsonValue v && v.GetValueKind() == JsonValueKind.String && v.GetValue<string>() is { Length: > 0 } s
            ? s : throw new ApiException(400, $"'{name}' (a non-empty string) is required.", param: name);
        string name = Field("lora_name"), path = Field("lora_path");
        try
        {
            await Real.AddLoraModuleAsync(name, path);
        }
        catch (Exception e) when (e is ArgumentException or IOException or InvalidDataException or InvalidOperationException)
        {
            throw new ApiException(400, e.Message, param: e is ArgumentException { ParamName: "name" } ? "lora_name" : "lora_path");
        }
        ctx.Response.ContentType = "text/plain";
        await ctx.Response.WriteAsync($"Success: LoRA adapter '{name}' added successfully.", ctx.RequestAborted);
    }

    /// <summary>vLLM's runtime adapter unloading: <c>{"lora_name": ...}</c>; 404 when none has that name, 409 while requests use it.</summary>
    private async Task UnloadLoraAdapter(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        var name = body["lora_name"] is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>()
            : throw new ApiException(400, "'lora_name' (a string) is required.", param: "lora_name");
        bool removed;
        try
        {
            removed = await Real.RemoveLoraModuleAsync(name);
        }
        catch (InvalidOperationException e)
        {
            throw new ApiException(409, e.Message, "conflict", "lora_name");
        }
        if (!removed) throw new ApiException(404, $"The LoRA adapter '{name}' is not loaded.", "NotFoundError", "lora_name");
        ctx.Response.ContentType = "text/plain";
        await ctx.Response.WriteAsync($"Success: LoRA adapter '{name}' removed successfully.", ctx.RequestAborted);
    }

    private IResult ListModels()
    {
        var data = new JsonArray
        {
            new JsonObject
            {
                ["id"] = ModelName, ["object"] = "model", ["created"] = _started, ["owned_by"] = "localvllm", ["root"] = options.Model,
                ["max_model_len"] = chat.MaxModelLen,
            },
        };
        // LoRA adapters as vLLM lists them: their own id, the folder as root, the base model as parent.
        foreach (var a in Adapters)
            data.Add(new JsonObject
            {
                ["id"] = a.Name, ["object"] = "model", ["created"] = _started, ["owned_by"] = "localvllm", ["root"] = a.Path, ["parent"] = ModelName,
                ["max_model_len"] = chat.MaxModelLen,
            });
        return Results.Content(new JsonObject { ["object"] = "list", ["data"] = data }.ToJsonString(Compact), "application/json");
    }

    // ---------------------------------------------------------------- chat completions

    private async Task ChatCompletions(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        var lora = CheckModel(body);
        string model = lora?.Name ?? ModelName;
        var request = OpenAiChatRequest.Parse(body);
        // vLLM refuses what cannot fit rather than shortening it; the prompt's own length is checked by the engine.
        if (request.Options(0).MaxOutputTokens is int max && max >= chat.MaxModelLen)
            throw new ApiException(400, $"max_tokens = {max} does not fit in this model's context of {chat.MaxModelLen} tokens (prompt included).", param: "max_tokens");
        if (request.Logprobs && engine is null) throw new ApiException(400, "logprobs are not available from this server's engine.", param: "logprobs");
        if (request.PromptLogprobs && request.Stream)
            throw new ApiException(400, "'prompt_logprobs' is not available when 'stream' is true (as in vLLM).", param: "prompt_logprobs");
        string id = $"chatcmpl-{Guid.NewGuid():N}";
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        if (OpenAiChatRequest.Bool(body, "use_beam_search") == true)
        {
            await BeamSearchChat(ctx, body, request, lora, model, id, created);
            return;
        }
        if (!request.Stream)
        {
            var completed = await Task.WhenAll(Enumerable.Range(0, request.N).Select(i => RunTurn(request, i, ctx.RequestAborted)));
            var choices = new JsonArray();
            foreach (var t in completed)
            {
                var choice = t.ToChoice();
                if (request.Echo is { } echoed) choice["message"]!["content"] = echoed + (choice["message"]!["content"]?.GetValue<string>() ?? "");
                choices.Add(choice);
            }
            var usage = Usage(completed.Select(t => t.Usage).ToList());
            var response = new JsonObject
            {
                ["id"] = id, ["object"] = "chat.completion", ["created"] = created, ["model"] = model, ["choices"] = choices, ["usage"] = usage,
            };
            if (request.PromptLogprobs)
                response["prompt_logprobs"] = completed[0] is { PromptIds: { } ids, PromptLogprobs: { } positions } && engine is not null
                    ? CompletionLogprobs.VllmPromptLogprobs(ids, positions, t => engine.Engine.Engine.Tokenizer!.Decode([t], skipSpecialTokens: false))
                    : null;
            await Json(ctx, response);
            return;
        }

        // One stream per completion; the first update of each comes before any byte is sent, so an overloaded engine or
        // a bad request still gets its status.
        await using var streams = new MergedStreams<ChatResponseUpdate>(Enumerable.Range(0, request.N)
            .Select(i => _chat.GetStreamingResponseAsync(request.Messages, request.Options(i), ctx.RequestAborted).GetAsyncEnumerator(ctx.RequestAborted))
            .ToList());
        await streams.StartAsync();
        StartEventStream(ctx);
        var turns = Enumerable.Range(0, streams.Count).Select(i => new ChatTurn(engine, request.Logprobs, i)).ToArray();
        var chunks = new ChatChunkWriter(ctx.Response.BodyWriter, id, created, model);
        if (request.ContinuousUsage)
        {
            // The prompt's length is known from each completion's first output, which the role event precedes.
            for (int i = 0; i < streams.Count; i++)
                if (streams.First(i)?.RawRepresentation is RequestOutput first) turns[i].PromptTokens = first.PromptTokenIds.Count;
            chunks.ContinuousUsage = i => (turns[i].PromptTokens, turns[i].CompletionTokens);
        }
        for (int i = 0; i < streams.Count; i++)
        {
            chunks.WriteRole(i);
            if (request.Echo is { Length: > 0 } echoed) chunks.Write(i, new ChatTurn.DeltaEvent("content", echoed, null, null), null); // vLLM's echo
        }
        await Flush(ctx);

        // The completions stream side by side: each one's updates are written as they come, tagged with its index.
        // Text of updates that are already waiting behind this one goes out in one event (PendingDeltas).
        var pending = new PendingDeltas(chunks, streams.Count);
        for (int open = streams.Count; open > 0;)
        {
            var (index, update) = await streams.ReadAsync(ctx.RequestAborted);
            if (update is null)
            {
                open--;
                pending.Finish(index, turns[index].FinishReason);
            }
            else
                foreach (var delta in turns[index].Add(update))
                    pending.Add(index, delta);
            if (!streams.MoreWaiting)
            {
                pending.WriteAll();
                await Flush(ctx);
            }
        }
        await streams.Completion;
        if (request.IncludeUsage)
            await Event(ctx, new JsonObject
            {
                ["id"] = id, ["object"] = "chat.completion.chunk", ["created"] = created, ["model"] = model, ["choices"] = new JsonArray(),
                ["usage"] = Usage(turns.Select(t => t.Usage).ToList()),
            });
        await ctx.Response.WriteAsync("data: [DONE]\n\n", ctx.RequestAborted);
    }

    private async Task<ChatTurn> RunTurn(OpenAiChatRequest request, int index, CancellationToken cancellationToken)
    {
        var turn = new ChatTurn(engine, request.Logprobs, index);
        await foreach (var u in _chat.GetStreamingResponseAsync(request.Messages, request.Options(index), cancellationToken).ConfigureAwait(false))
            turn.Add(u);
        return turn;
    }

    private static JsonObject Usage(IReadOnlyList<UsageDetails?> usages)
    {
        // n completions share one prompt: it is counted once, as vLLM does.
        long prompt = usages.Max(u => u?.InputTokenCount ?? 0), completion = usages.Sum(u => u?.OutputTokenCount ?? 0);
        long cached = usages.Max(u => u?.CachedInputTokenCount ?? 0);
        return new JsonObject
        {
            ["prompt_tokens"] = prompt, ["completion_tokens"] = completion, ["total_tokens"] = prompt + completion,
            ["prompt_tokens_details"] = new JsonObject { ["cached_tokens"] = cached },
        };
    }

    // ---------------------------------------------------------------- completions

    private async Task Completions(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        var lora = CheckModel(body);
        string model = lora?.Name ?? ModelName;
        var engine = Real;
        var core = engine.Engine.Engine;
        var prompts = OpenAiCompletionRequest.Prompts(body, text => core.EncodePrompt(text));
        var sampling = OpenAiCompletionRequest.Sampling(body, core.DefaultSamplingParams());
        bool echo = OpenAiCompletionRequest.Echo(body);
        bool promptLogprobs = OpenAiChatRequest.Int(body, "prompt_logprobs") is not null;
        bool stream = OpenAiChatRequest.Bool(body, "stream") ?? false;
        if (stream && promptLogprobs)
            throw new ApiException(400, "'prompt_logprobs' is not available when 'stream' is true (as in vLLM); 'echo' with 'logprobs' streams the prompt's log-probabilities.", param: "prompt_logprobs");
        bool includeUsage = OpenAiChatRequest.IncludeUsageOf(body), continuousUsage = OpenAiChatRequest.ContinuousUsageOf(body);
        foreach (var p in prompts) engine.Validator.Validate(p.Ids, sampling);
        string id = $"cmpl-{Guid.NewGuid():N}";
        long created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        var tokenizer = core.Tokenizer!;
        // What echo puts before each completion: the prompt as it was sent, or the decoded ids.
        // (A prompt cut by truncate_prompt_tokens comes back as what the engine kept.)
        string[]? echoes = echo ? prompts.Select(p => engine.Validator.Truncate(p.Ids, sampling) is var kept && kept.Count == p.Ids.Length && p.Text is { } text
            ? text : tokenizer.Decode(kept, skipSpecialTokens: false)).ToArray() : null;
        var logprobs = new CompletionLogprobs(t => tokenizer.Decode([t], skipSpecialTokens: false));
        if (OpenAiChatRequest.Bool(body, "use_beam_search") == true)
        {
            await BeamSearchCompletions(ctx, engine, body, prompts, sampling, stream, id, created, lora, model);
            return;
        }

        if (!stream)
        {
            var outputs = await Task.WhenAll(prompts.Select(p => engine.Engine.GenerateFinalAsync(p.Ids, sampling with { OutputKind = RequestOutputKind.FinalOnly }, ctx.RequestAborted, lora)));
            var choices = new JsonArray();
            long promptTokens = 0, completionTokens = 0, cached = 0;
            for (int i = 0; i < outputs.Length; i++)
            {
                var o = outputs[i];
                if (o.Error is { } error) throw error;
                promptTokens += o.PromptTokenIds.Count;
                cached += o.NumCachedTokens;
                foreach (var c in o.Outputs)
                {
                    completionTokens += c.TokenIds.Count;
                    int index = i * sampling.N + c.Index;
                    var choice = new JsonObject
                    {
                        ["index"] = index, ["text"] = echoes is null ? c.Text : echoes[i] + c.Text,
                        ["logprobs"] = c.Logprobs is null ? null : echoes is null ? logprobs.Of(index, c.TokenIds, c.Logprobs)
                            : logprobs.Of(index, [.. o.PromptTokenIds, .. c.TokenIds], [.. o.PromptLogprobs!, .. c.Logprobs]),
                        ["finish_reason"] = c.FinishReason, ["stop_reason"] = StopReason(c.StopReason),
                    };
                    if (promptLogprobs) choice["prompt_logprobs"] = CompletionLogprobs.VllmPromptLogprobs(o.PromptTokenIds, o.PromptLogprobs!, t => tokenizer.Decode([t], skipSpecialTokens: false));
                    choices.Add(choice);
                }
            }
            await Json(ctx, new JsonObject
            {
                ["id"] = id, ["object"] = "text_completion", ["created"] = created, ["model"] = model, ["choices"] = choices,
                ["usage"] = new JsonObject
                {
                    ["prompt_tokens"] = promptTokens, ["completion_tokens"] = completionTokens, ["total_tokens"] = promptTokens + completionTokens,
                    ["prompt_tokens_details"] = new JsonObject { ["cached_tokens"] = cached },
                },
            });
            return;
        }

        if (prompts.Count != 1 || sampling.N != 1 || echo)
        {
            await StreamCompletions(ctx, engine, prompts.Select(p => p.Ids).ToList(), echoes, sampling, logprobs, id, created, includeUsage, continuousUsage, lora, model);
            return;
        }
        var run = engine.Engine.GenerateAsync(prompts[0].Ids, sampling with { OutputKind = RequestOutputKind.Delta }, cancellationToken: ctx.RequestAborted, lora: lora)
            .GetAsyncEnumerator(ctx.RequestAborted);
        await using var _ = run;
        bool any = await run.MoveNextAsync();
        StartEventStream(ctx);
        var chunks = new CompletionChunkWriter(ctx.Response.BodyWriter, id, created, model);
        if (continuousUsage)
        {
            long promptSoFar = run.Current?.PromptTokenIds.Count ?? 0, generatedSoFar = 0;
            chunks.ContinuousUsage = _ => (promptSoFar, generatedSoFar);
            chunks.Progress = (_, generatedNow) => generatedSoFar = generatedNow;
        }
        var (last, generated) = await WriteCompletionEvents(run, any, chunks, c => c.Logprobs is null ? null : logprobs.Of(c.Index, c.TokenIds, c.Logprobs), () => Flush(ctx));
        if (includeUsage && last is not null)
            await CompletionUsageEvent(ctx, model, id, created, last.PromptTokenIds.Count, generated, last.NumCachedTokens);
        await ctx.Response.WriteAsync("data: [DONE]\n\n", ctx.RequestAborted);
    }

    /// <summary>
    /// vLLM's <c>use_beam_search</c> on completions: <c>n</c> beams per prompt (<see cref="AsyncLlmEngine.BeamSearchAsync"/>),
    /// each a choice, best first; <c>length_penalty</c>, <c>ignore_eos</c>, <c>include_stop_str_in_output</c> and
    /// <c>temperature</c> as vLLM passes them. Its sequences are known only at its end, so it is not streamed.
    /// </summary>
    private async Task BeamSearchCompletions(HttpContext ctx, LocalVllmEngine engine, JsonObject body, IReadOnlyList<OpenAiCompletionRequest.Prompt> prompts,
        SamplingParams sampling, bool stream, string id, long created, LoraRequest? lora, string model)
    {
        if (stream) throw new ApiException(400, "'use_beam_search' is not served with 'stream': a beam search's sequences are known only at its end.", param: "stream");
        foreach (var field in new[] { "logprobs", "echo", "prompt_logprobs" })
            if (body[field] is JsonValue v && v.GetValueKind() is not (JsonValueKind.Null or JsonValueKind.False))
                throw new ApiException(400, $"'{field}' is not served with 'use_beam_search'.", param: field);
        var beam = new BeamSearchParams
        {
            BeamWidth = sampling.N, MaxTokens = sampling.MaxTokens, IgnoreEos = sampling.IgnoreEos, Temperature = sampling.Temperature,
            LengthPenalty = OpenAiChatRequest.Float(body, "length_penalty") ?? 1.0,
            IncludeStopStrInOutput = OpenAiChatRequest.Bool(body, "include_stop_str_in_output") ?? false,
        };
        ValidateBeamSearch(engine, beam);
        var outputs = await engine.Engine.BeamSearchAsync(prompts.Select(p => (IReadOnlyList<int>)p.Ids).ToArray(), beam, prompts.Select(p => p.Text).ToArray(), ctx.RequestAborted, lora);
        var choices = new JsonArray();
        long promptTokens = 0, completionTokens = 0, cached = 0;
        for (int i = 0; i < outputs.Count; i++)
        {
            promptTokens += outputs[i].PromptTokenIds.Count;
            cached += outputs[i].NumCachedTokens;
            var sequences = outputs[i].Sequences;
            for (int b = 0; b < sequences.Count; b++)
            {
                completionTokens += sequences[b].TokenIds.Count;
                choices.Add(new JsonObject
                {
                    ["index"] = i * beam.BeamWidth + b, ["text"] = sequences[b].Text, ["logprobs"] = null,
                    ["finish_reason"] = sequences[b].FinishReason, ["stop_reason"] = null,
                });
            }
        }
        await Json(ctx, new JsonObject
        {
            ["id"] = id, ["object"] = "text_completion", ["created"] = created, ["model"] = model, ["choices"] = choices,
            ["usage"] = new JsonObject
            {
                ["prompt_tokens"] = promptTokens, ["completion_tokens"] = completionTokens, ["total_tokens"] = promptTokens + completionTokens,
                ["prompt_tokens_details"] = new JsonObject { ["cached_tokens"] = cached },
            },
        });
    }

    /// <summary>
    /// vLLM's <c>use_beam_search</c> on chat completions: the conversation rendered as a chat call renders it, then
    /// <c>n</c> beams, each a choice whose message is the beam's text, best first. Not streamed; tools, response
    /// formats, logprobs and echo are refused by name (beams are scored on raw text).
    /// </summary>
    private async Task BeamSearchChat(HttpContext ctx, JsonObject body, OpenAiChatRequest request, LoraRequest? lora, string model, string id, long created)
    {
        var engine = Real;
        if (request.Stream) throw new ApiException(400, "'use_beam_search' is not served with 'stream': a beam search's sequences are known only at its end.", param: "stream");
        foreach (var field in new[] { "tools", "response_format", "structured_outputs", "logprobs", "echo", "prompt_logprobs" })
            if (body[field] is { } v && v.GetValueKind() is not (JsonValueKind.Null or JsonValueKind.False))
                throw new ApiException(400, $"'{field}' is not served with 'use_beam_search'.", param: field);
        var options = request.Options(0);
        var (_, ids) = _chat.RenderPrompt(request.Messages, options);
        var core = engine.Engine.Engine;
        int room = core.MaxModelLen - ids.Length;
        var defaults = core.DefaultSamplingParams();
        var beam = new BeamSearchParams
        {
            BeamWidth = request.N, MaxTokens = options.MaxOutputTokens ?? Math.Min(room, defaults.MaxTokens), Temperature = options.Temperature ?? defaults.Temperature,
            IgnoreEos = OpenAiChatRequest.Bool(body, "ignore_eos") ?? false, LengthPenalty = OpenAiChatRequest.Float(body, "length_penalty") ?? 1.0,
            IncludeStopStrInOutput = OpenAiChatRequest.Bool(body, "include_stop_str_in_output") ?? false,
        };
        ValidateBeamSearch(engine, beam);
        engine.Validator.Validate(ids, new SamplingParams { MaxTokens = beam.MaxTokens });
        var output = (await engine.Engine.BeamSearchAsync([ids], beam, null, ctx.RequestAborted, lora))[0];
        var choices = new JsonArray();
        for (int b = 0; b < output.Sequences.Count; b++)
            choices.Add(new JsonObject
            {
                ["index"] = b, ["message"] = new JsonObject { ["role"] = "assistant", ["content"] = output.Sequences[b].Text },
                ["logprobs"] = null, ["finish_reason"] = output.Sequences[b].FinishReason,
            });
        long completion = output.Sequences.Sum(s => (long)s.TokenIds.Count);
        await Json(ctx, new JsonObject
        {
            ["id"] = id, ["object"] = "chat.completion", ["created"] = created, ["model"] = model, ["choices"] = choices,
            ["usage"] = new JsonObject
            {
                ["prompt_tokens"] = ids.Length, ["completion_tokens"] = completion, ["total_tokens"] = ids.Length + completion,
                ["prompt_tokens_details"] = new JsonObject { ["cached_tokens"] = output.NumCachedTokens },
            },
        });
    }

    /// <summary>Checks beam search settings, answering a 400 that names the request's field.</summary>
    private static void ValidateBeamSearch(LocalVllmEngine engine, BeamSearchParams beam)
    {
        try
        {
            beam.Validate(engine.Validator.MaxLogprobs);
        }
        catch (ArgumentException e)
        {
            throw new ApiException(400, e.Message, param: e.ParamName switch
            {
                nameof(BeamSearchParams.BeamWidth) => "n", nameof(BeamSearchParams.MaxTokens) => "max_tokens",
                nameof(BeamSearchParams.Temperature) => "temperature", _ => "length_penalty",
            });
        }
    }

    private static Task CompletionUsageEvent(HttpContext ctx, string model, string id, long created, long promptTokens, long generated, long cached) =>
        Event(ctx, new JsonObject
        {
            ["id"] = id, ["object"] = "text_completion", ["created"] = created, ["model"] = model, ["choices"] = new JsonArray(),
            ["usage"] = new JsonObject
            {
                ["prompt_tokens"] = promptTokens, ["completion_tokens"] = generated, ["total_tokens"] = promptTokens + generated,
                ["prompt_tokens_details"] = new JsonObject { ["cached_tokens"] = cached },
            },
        });

    /// <summary>
    /// A streamed completion of several prompts, or of n completions each (vLLM streams both), or with the prompt
    /// echoed: one engine request per prompt, their outputs written as they come, choice index = prompt index x n +
    /// completion index, as the non-streamed response numbers them; with <paramref name="echoes"/>, a choice's first
    /// event starts with its prompt (and, with logprobs, the prompt's). Every request's first output comes before any
    /// byte is sent, so a refused request still gets its status.
    /// </summary>
    private async Task StreamCompletions(HttpContext ctx, LocalVllmEngine engine, IReadOnlyList<int[]> prompts, string[]? echoes, SamplingParams sampling,
        CompletionLogprobs logprobs, string id, long created, bool includeUsage, bool continuousUsage, LoraRequest? lora, string model)
    {
        await using var runs = new MergedStreams<RequestOutput>(prompts
            .Select(p => engine.Engine.GenerateAsync(p, sampling with { OutputKind = RequestOutputKind.Delta }, cancellationToken: ctx.RequestAborted, lora: lora).GetAsyncEnumerator(ctx.RequestAborted))
            .ToList());
        await runs.StartAsync();
        StartEventStream(ctx);
        var chunks = new CompletionChunkWriter(ctx.Response.BodyWriter, id, created, model);
        var lasts = new RequestOutput?[runs.Count];
        var started = new bool[runs.Count * sampling.N];
        var done = new long[started.Length];
        long generated = 0;
        if (continuousUsage) chunks.ContinuousUsage = i => (lasts[i / sampling.N]?.PromptTokenIds.Count ?? 0, done[i]);
        for (int open = runs.Count; open > 0;)
        {
            var (prompt, output) = await runs.ReadAsync(ctx.RequestAborted);
            if (output is null)
            {
                open--;
                continue;
            }
            if (output.Error is { } error) throw error;
            lasts[prompt] = output;
            foreach (var c in output.Outputs)
            {
                generated += c.TokenIds.Count;
                int index = prompt * sampling.N + c.Index;
                done[index] += c.TokenIds.Count;
                bool first = !started[index];
                started[index] = true;
                if (first && echoes is not null)
                    chunks.Write(index, echoes[prompt] + c.Text,
                        c.Logprobs is null ? null : logprobs.Of(index, [.. output.PromptTokenIds, .. c.TokenIds], [.. output.PromptLogprobs!, .. c.Logprobs]),
                        c.FinishReason, StopReason(c.StopReason));
                else if (c.Text.Length > 0 || c.FinishReason is not null)
                    chunks.Write(index, c.Text, c.Logprobs is null ? null : logprobs.Of(index, c.TokenIds, c.Logprobs), c.FinishReason, StopReason(c.StopReason));
            }
            if (!runs.MoreWaiting) await Flush(ctx);
        }
        await runs.Completion;
        if (includeUsage)
            await CompletionUsageEvent(ctx, model, id, created, lasts.Sum(o => (long)(o?.PromptTokenIds.Count ?? 0)), generated, lasts.Sum(o => (long)(o?.NumCachedTokens ?? 0)));
        await ctx.Response.WriteAsync("data: [DONE]\n\n", ctx.RequestAborted);
    }

    /// <summary>
    /// Writes a streamed completion's outputs as <c>text_completion</c> events and returns the last output and the
    /// tokens generated. When the next output is already waiting as one is handled (the engine ran ahead of this
    /// connection: a loaded server), the text of outputs with no logprobs and no finish reason is carried into the next
    /// event instead of an event each, and the events go out in one flush: nothing waits for tokens that are not there
    /// yet, so the first token and an idle server's tokens are sent as they come.
    /// </summary>
    internal static async Task<(RequestOutput? Last, long Generated)> WriteCompletionEvents(IAsyncEnumerator<RequestOutput> run, bool any,
        CompletionChunkWriter chunks, Func<CompletionOutput, JsonObject?> logprobs, Func<Task> flush)
    {
        RequestOutput? last = null;
        long generated = 0;
        var carried = new System.Text.StringBuilder();
        while (any)
        {
            var o = last = run.Current;
            if (o.Error is { } error) throw error;
            var outputs = o.Outputs;
            foreach (var c in outputs) generated += c.TokenIds.Count;
            chunks.Progress?.Invoke(0, generated);
            var next = run.MoveNextAsync();
            if (next.IsCompleted && outputs is [{ FinishReason: null, Logprobs: null } only])
            {
                carried.Append(only.Text);
                any = await next;
                continue;
            }
            foreach (var c in outputs)
            {
                string text = c.Text;
                if (carried.Length > 0)
                {
                    text = carried.Append(text).ToString();
                    carried.Clear();
                }
                if (text.Length == 0 && c.FinishReason is null) continue;
                chunks.Write(c.Index, text, logprobs(c), c.FinishReason, StopReason(c.StopReason));
            }
            if (!next.IsCompleted) await flush();
            any = await next;
        }
        if (carried.Length > 0 && last is not null) // a stream that ended without a finish reason still delivers its text
            chunks.Write(last.Outputs[0].Index, carried.ToString(), null, null, null);
        return (last, generated);
    }

    private static JsonNode? StopReason(object? reason) => reason switch { int t => t, string s => s, _ => null };

    // ---------------------------------------------------------------- tokenize

    private async Task Tokenize(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        CheckModel(body);
        if (body["messages"] is JsonArray)
        {
            // The chat form: the messages rendered with the model's chat template, as a chat completion would send them.
            var chatBody = new JsonObject();
            foreach (var key in new[] { "messages", "tools", "chat_template_kwargs", "add_generation_prompt", "continue_final_message" })
                if (body[key] is { } value) chatBody[key] = value.DeepClone();
            var chatRequest = OpenAiChatRequest.Parse(chatBody);
            var (_, chatIds) = _chat.RenderPrompt(chatRequest.Messages, chatRequest.Options(0));
            await Json(ctx, TokenizeResponse(body, chatIds, chat.MaxModelLen));
            return;
        }
        if (body["prompt"] is not JsonValue prompt || prompt.GetValueKind() != JsonValueKind.String)
            throw new ApiException(400, "'prompt' (a string) or 'messages' (a chat) is required.", param: "prompt");
        bool special = OpenAiChatRequest.Bool(body, "add_special_tokens") ?? true;
        var engine = Real;
        var tokenizer = engine.Engine.Engine.Tokenizer!;
        var ids = special ? engine.Engine.Engine.EncodePrompt(prompt.GetValue<string>()) : tokenizer.Encode(prompt.GetValue<string>(), addSpecialTokens: false);
        await Json(ctx, TokenizeResponse(body, ids, engine.MaxModelLen));
    }

    /// <summary>/tokenize's answer; with vLLM's <c>return_token_strs</c>, each token as the vocabulary spells it.</summary>
    private JsonObject TokenizeResponse(JsonObject body, int[] ids, int maxModelLen)
    {
        var response = new JsonObject { ["count"] = ids.Length, ["max_model_len"] = maxModelLen, ["tokens"] = new JsonArray(ids.Select(i => (JsonNode?)i).ToArray()) };
        if (OpenAiChatRequest.Bool(body, "return_token_strs") == true)
        {
            var tokenizer = Real.Engine.Engine.Tokenizer!;
            response["token_strs"] = new JsonArray(ids.Select(i => (JsonNode?)tokenizer.TokenPiece(i)).ToArray());
        }
        return response;
    }

    private async Task Detokenize(HttpContext ctx)
    {
        var body = await ReadBody(ctx);
        CheckModel(body);
        if (body["tokens"] is not JsonArray tokens) throw new ApiException(400, "'tokens' (an array of token ids) is required.", param: "tokens");
        var tokenizer = Real.Engine.Engine.Tokenizer!;
        var ids = tokens.Select(t => t is JsonValue v && v.TryGetValue<int>(out var id) && id >= 0 && id < tokenizer.Count
            ? id : throw new ApiException(400, $"'tokens' holds {t?.ToJsonString() ?? "null"}, which is not a token id of this model (0..{tokenizer.Count - 1}).", param: "tokens")).ToArray();
        await Json(ctx, new JsonObject { ["prompt"] = tokenizer.Decode(ids, skipSpecialTokens: false) });
    }

    // ---------------------------------------------------------------- plumbing

    private static Task Json(HttpContext ctx, JsonObject body)
    {
        ctx.Response.ContentType = "application/json";
        return ctx.Response.WriteAsync(body.ToJsonString(Compact), ctx.RequestAborted);
    }

    private static void StartEventStream(HttpContext ctx)
    {
        ctx.Response.StatusCode = 200;
        ctx.Response.ContentType = "text/event-stream";
        ctx.Response.Headers.CacheControl = "no-cache";
    }

    /// <summary>One Server-Sent Event, written straight into the response pipe as UTF-8 and flushed.</summary>
    private static async Task Event(HttpContext ctx, JsonObject data)
    {
        Write(ctx, data);
        await ctx.Response.BodyWriter.FlushAsync(ctx.RequestAborted);
    }

    /// <summary>
    /// One Server-Sent Event into the response pipe, not yet flushed: while the next output is already there (the
    /// engine ran ahead of the connection), events go out together in one write instead of one send each.
    /// </summary>
    private static void Write(HttpContext ctx, JsonObject data)
    {
        var writer = ctx.Response.BodyWriter;
        writer.Write("data: "u8);
        using (var json = new Utf8JsonWriter(writer, new JsonWriterOptions { Encoder = Compact.Encoder }))
            data.WriteTo(json);
        writer.Write("\n\n"u8);
    }

    private static async Task Flush(HttpContext ctx) => await ctx.Response.BodyWriter.FlushAsync(ctx.RequestAborted);
}

/// <summary>One choice being assembled from the chat client's updates: text, reasoning, tool calls, logprobs, usage.</summary>
internal sealed class ChatTurn(LocalVllmEngine? engine, bool logprobs, int index)
{
    private readonly StringBuilder _text = new(), _reasoning = new();
    private readonly JsonArray _toolCalls = [];
    private readonly JsonArray _logprobs = [];
    private object? _lastRaw;

    public UsageDetails? Usage { get; private set; }
    public string FinishReason { get; private set; } = "stop";
    /// <summary>The prompt's tokens and the tokens generated so far, from the engine's outputs behind the updates.</summary>
    public long PromptTokens { get; set; }
    public long CompletionTokens { get; private set; }
    /// <summary>The prompt's ids and log-probabilities, when the request asked for them (vLLM's <c>prompt_logprobs</c>).</summary>
    public IReadOnlyList<int>? PromptIds { get; private set; }
    public IReadOnlyList<PositionLogprobs?>? PromptLogprobs { get; private set; }
    private object? _counted;

    /// <summary>One stream delta: a text field (<c>content</c> or <c>reasoning_content</c>) or tool calls, with the logprobs that came with it (all absent: an empty delta).</summary>
    public readonly record struct DeltaEvent(string? Field, string? Text, JsonArray? ToolCalls, JsonObject? Logprobs);

    /// <summary>Takes one update; returns the stream deltas it makes (a non-streamed response ignores them).</summary>
    public List<DeltaEvent> Add(ChatResponseUpdate u)
    {
        var events = new List<DeltaEvent>();
        JsonObject? lp = null;
        if (u.RawRepresentation is RequestOutput counted && !ReferenceEquals(counted, _counted))
        {
            _counted = counted; // several updates may come from one engine output: its tokens count once
            PromptTokens = counted.PromptTokenIds.Count;
            if (counted.PromptLogprobs is { } promptLogprobs) (PromptIds, PromptLogprobs) = (counted.PromptTokenIds, promptLogprobs);
            if (counted.Outputs.Count > 0) CompletionTokens += counted.Outputs[0].TokenIds.Count;
        }
        if (logprobs && u.RawRepresentation is RequestOutput raw && !ReferenceEquals(raw, _lastRaw))
        {
            _lastRaw = raw;
            if (raw.Outputs.Count > 0 && raw.Outputs[0].Logprobs is { Count: > 0 } positions)
            {
                var content = new JsonArray();
                foreach (var p in positions) content.Add(Entry(p));
                foreach (var e in content) _logprobs.Add(e!.DeepClone());
                lp = new JsonObject { ["content"] = content };
            }
        }
        foreach (var c in u.Contents)
        {
            switch (c)
            {
                case TextContent t:
                    _text.Append(t.Text);
                    events.Add(new("content", t.Text, null, lp));
                    lp = null;
                    break;
                case TextReasoningContent r:
                    _reasoning.Append(r.Text);
                    events.Add(new("reasoning_content", r.Text, null, lp));
                    lp = null;
                    break;
                case FunctionCallContent call:
                {
                    var json = new JsonObject
                    {
                        ["id"] = call.CallId, ["type"] = "function",
                        ["function"] = new JsonObject { ["name"] = call.Name, ["arguments"] = JsonSerializer.Serialize(call.Arguments ?? new Dictionary<string, object?>()) },
                    };
                    var streamed = (JsonObject)json.DeepClone();
                    streamed["index"] = _toolCalls.Count;
                    _toolCalls.Add(json);
                    events.Add(new(null, null, [streamed], lp));
                    lp = null;
                    break;
                }
                case UsageContent usage:
                    Usage = usage.Details;
                    break;
            }
        }
        if (lp is not null) events.Add(new(null, null, null, lp));
        if (u.FinishReason is { } finish)
            FinishReason = finish == ChatFinishReason.Length ? "length" : finish == ChatFinishReason.ToolCalls ? "tool_calls" : "stop";
        return events;
    }

    private JsonObject Entry(PositionLogprobs p)
    {
        var tokenizer = engine!.Engine.Engine.Tokenizer!;
        JsonObject Token(int id, float logprob)
        {
            var text = tokenizer.Decode([id], skipSpecialTokens: false);
            return new JsonObject
            {
                ["token"] = text, ["logprob"] = logprob,
                ["bytes"] = new JsonArray(tokenizer.TokenBytes(id).ToArray().Select(b => (JsonNode?)(int)b).ToArray()),
            };
        }
        var entry = Token(p.TokenId, p.Logprob);
        entry["top_logprobs"] = new JsonArray(p.Top.Select(t => (JsonNode?)Token(t.TokenId, t.Logprob)).ToArray());
        return entry;
    }

    public JsonObject ToChoice()
    {
        var message = new JsonObject
        {
            ["role"] = "assistant",
            ["content"] = _text.Length == 0 && _toolCalls.Count > 0 ? null : _text.ToString(),
            ["reasoning_content"] = _reasoning.Length > 0 ? _reasoning.ToString() : null,
        };
        if (_toolCalls.Count > 0) message["tool_calls"] = _toolCalls.DeepClone();
        return new JsonObject
        {
            ["index"] = index, ["message"] = message,
            ["logprobs"] = logprobs ? new JsonObject { ["content"] = _logprobs.DeepClone() } : null,
            ["finish_reason"] = FinishReason,
        };
    }
}

/// <summary>
/// Writes Server-Sent Events of one streamed response straight into the response pipe with one reused
/// <see cref="Utf8JsonWriter"/> and the request's constant fields encoded once: a token's event builds no JSON tree.
/// Each event is <c>{"id", "object", "created", "model", "choices": [{"index", ...}]}</c>; the subclass writes the
/// rest of the choice.
/// </summary>
internal abstract class StreamChunkWriter(System.IO.Pipelines.PipeWriter pipe, string id, long created, string model, string objectType)
{
    private static readonly System.Text.Encodings.Web.JavaScriptEncoder Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping;
    private readonly JsonEncodedText _id = JsonEncodedText.Encode(id, Encoder);
    private readonly JsonEncodedText _model = JsonEncodedText.Encode(model, Encoder);
    private readonly JsonEncodedText _object = JsonEncodedText.Encode(objectType, Encoder);
    protected readonly Utf8JsonWriter Json = new(pipe, new JsonWriterOptions { Encoder = Encoder });
    private int _choice;

    /// <summary>
    /// vLLM's <c>continuous_usage_stats</c>: when set, every event also carries the usage so far (prompt and generated
    /// tokens) of its choice, read from this when the event is written.
    /// </summary>
    public Func<int, (long Prompt, long Completion)>? ContinuousUsage { get; set; }

    /// <summary>Starts an event, up to and including the choice's <c>index</c>.</summary>
    protected void BeginChoice(int index)
    {
        _choice = index;
        pipe.Write("data: "u8);
        Json.Reset(pipe);
        Json.WriteStartObject();
        Json.WriteString("id"u8, _id);
        Json.WriteString("object"u8, _object);
        Json.WriteNumber("created"u8, created);
        Json.WriteString("model"u8, _model);
        Json.WriteStartArray("choices"u8);
        Json.WriteStartObject();
        Json.WriteNumber("index"u8, index);
    }

    /// <summary>Writes a property whose value is a JSON node, or null.</summary>
    protected void WriteNode(ReadOnlySpan<byte> name, JsonNode? value)
    {
        Json.WritePropertyName(name);
        if (value is null) Json.WriteNullValue(); else value.WriteTo(Json);
    }

    /// <summary>Closes the choice and the event.</summary>
    protected void EndChoice()
    {
        Json.WriteEndObject();
        Json.WriteEndArray();
        if (ContinuousUsage is { } usage)
        {
            var (prompt, completion) = usage(_choice);
            Json.WriteStartObject("usage"u8);
            Json.WriteNumber("prompt_tokens"u8, prompt);
            Json.WriteNumber("completion_tokens"u8, completion);
            Json.WriteNumber("total_tokens"u8, prompt + completion);
            Json.WriteEndObject();
        }
        Json.WriteEndObject();
        Json.Flush();
        pipe.Write("\n\n"u8);
    }
}

/// <summary><c>chat.completion.chunk</c> events: a delta (text, reasoning or tool calls), its logprobs and the finish reason.</summary>
internal sealed class ChatChunkWriter(System.IO.Pipelines.PipeWriter pipe, string id, long created, string model)
    : StreamChunkWriter(pipe, id, created, model, "chat.completion.chunk")
{
    /// <summary>The first event of completion <paramref name="index"/>: the assistant role with empty content.</summary>
    public void WriteRole(int index) => Write(index, new ChatTurn.DeltaEvent("content", "", null, null), null, role: true);

    /// <summary>One event: <paramref name="delta"/> of completion <paramref name="index"/>, and its finish reason when it is the last.</summary>
    public void Write(int index, ChatTurn.DeltaEvent delta, string? finishReason, bool role = false)
    {
        BeginChoice(index);
        Json.WriteStartObject("delta"u8);
        if (role) Json.WriteString("role"u8, "assistant"u8);
        if (delta.Field is not null) Json.WriteString(delta.Field, delta.Text);
        if (delta.ToolCalls is not null) WriteNode("tool_calls"u8, delta.ToolCalls);
        Json.WriteEndObject();
        WriteNode("logprobs"u8, delta.Logprobs);
        if (finishReason is null) Json.WriteNull("finish_reason"u8); else Json.WriteString("finish_reason"u8, finishReason);
        EndChoice();
    }
}

/// <summary><c>text_completion</c> events: text, logprobs, finish and stop reasons.</summary>
internal sealed class CompletionChunkWriter(System.IO.Pipelines.PipeWriter pipe, string id, long created, string model)
    : StreamChunkWriter(pipe, id, created, model, "text_completion")
{
    /// <summary>Told (choice, tokens generated so far) as a single stream's outputs arrive, before their events are written.</summary>
    public Action<int, long>? Progress { get; set; }

    public void Write(int index, string text, JsonObject? logprobs, string? finishReason, JsonNode? stopReason)
    {
        BeginChoice(index);
        Json.WriteString("text"u8, text);
        WriteNode("logprobs"u8, logprobs);
        if (finishReason is null) Json.WriteNull("finish_reason"u8); else Json.WriteString("finish_reason"u8, finishReason);
        WriteNode("stop_reason"u8, stopReason);
        EndChoice();
    }
}
