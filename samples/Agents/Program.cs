using System.Diagnostics;
using LocalVllm;
using LocalVllm.Engine;
using LocalVllm.Fixtures;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.SemanticKernel;

// The Agents sample: several agents that share a long system prompt and tool list answer questions concurrently
// through one in-process engine, then a RAG step asks several questions about one cached document. It prints each
// call's time to first token and cached prompt tokens, and the engine's prefix-cache hit rate.
string? model = null;
for (int i = 0; i < args.Length; i++)
    if (args[i] == "--model" && i + 1 < args.Length) model = args[++i];

bool demo = model is null;
if (demo)
{
    model = Path.Combine(Path.GetTempPath(), "localvllm-demo-model-v2");
    if (!File.Exists(Path.Combine(model, "model.safetensors")))
    {
        int vocab = RandomModel.WriteByteTokenizer(model);
        RandomModel.Write(model, new RandomModelSpec { VocabSize = vocab + 1, HiddenSize = 128, IntermediateSize = 256, NumHiddenLayers = 4, EosTokenId = 258 }, seed: 1);
    }
    Console.WriteLine($"No --model given: using a small built-in demo model with random weights ({model}).");
    Console.WriteLine("Its answers are meaningless; only the machinery (batching, prefix caching, streaming) is shown.");
    Console.WriteLine("For real answers: --model /path/to/Qwen3-0.6B (a Hugging Face model directory).\n");
}

var kernelBuilder = Kernel.CreateBuilder();
kernelBuilder.AddLocalVllmChatCompletion(o => { o.Model = model!; o.Engine.KvCacheMemoryBytes = 256L << 20; });
var kernel = kernelBuilder.Build();
var chat = kernel.GetRequiredService<IChatClient>();
var engine = chat.GetService<AsyncLlmEngine>()!;

const string SharedHead = """
    You are one agent in a team that answers questions about a small bakery's operations. Work carefully: read the
    question, decide whether a tool is needed, and answer in at most three sentences. Never invent figures; if a figure
    is needed, call the right tool. Tools available to every agent:
    - get_inventory(item: string): current stock of an ingredient, in kilograms.
    - get_sales(day: string): the number of loaves sold on a given day.
    - get_schedule(staff: string): the shifts of a member of staff this week.
    - place_order(item: string, kilograms: number): orders an ingredient from the supplier.
    House rules: flour is reordered below 20 kg; the oven is serviced on Mondays; deliveries arrive before 7 am.
    """;
string[] roles = ["the planner, who turns requests into steps", "the researcher, who looks up figures", "the reviewer, who checks answers"];
string[] questions = ["Do we need to order flour?", "How many loaves did we sell on Friday?", "Who opens on Monday?", "Is the oven available on Monday morning?"];
var options = new ChatOptions { Temperature = 0, MaxOutputTokens = 24 };

// Real tools for every agent. Parameters are enums and bounded numbers, so a call is short and always well formed.
int invocations = 0;
AIFunction[] tools =
[
    AIFunctionFactory.Create((Ingredient item) => { Interlocked.Increment(ref invocations); return $"{item}: {(int)item * 7 + 12} kg"; }, "get_inventory", "Current stock of an ingredient, in kilograms."),
    AIFunctionFactory.Create((DayOfWeek day) => { Interlocked.Increment(ref invocations); return $"{(int)day * 13 + 90} loaves on {day}"; }, "get_sales", "The number of loaves sold on a given day."),
    AIFunctionFactory.Create((Staff staff) => { Interlocked.Increment(ref invocations); return $"{staff}: Monday and Thursday, 5 am"; }, "get_schedule", "The shifts of a member of staff this week."),
    AIFunctionFactory.Create((Ingredient item, [System.ComponentModel.DataAnnotations.Range(1, 100)] int kilograms) => { Interlocked.Increment(ref invocations); return $"ordered {kilograms} kg of {item}"; }, "place_order", "Orders an ingredient from the supplier."),
];
// The function-invocation middleware runs the calls the model makes and sends the results back. The first turn of
// each agent requires a tool call: the engine constrains decoding to a <tool_call> whose arguments match a tool's
// parameter schema, so even the random demo model makes calls that parse and run.
var agentChat = new ChatClientBuilder(chat).UseFunctionInvocation().Build();
var toolTurn = new ChatOptions { Temperature = 0.7f, Seed = 1, MaxOutputTokens = 160, Tools = [.. tools], ToolMode = ChatToolMode.RequireAny, AllowMultipleToolCalls = false };
int toolCalls = 0, parsed = 0;
var toolTurns = Enumerable.Range(0, roles.Length).Select(async r =>
{
    var response = await agentChat.GetResponseAsync(
        [new(ChatRole.System, SharedHead + $"\nYou are {roles[r]}."), new(ChatRole.User, questions[r])], toolTurn);
    foreach (var call in response.Messages.SelectMany(m => m.Contents).OfType<Microsoft.Extensions.AI.FunctionCallContent>())
    {
        Interlocked.Increment(ref toolCalls);
        if (call.Exception is null) Interlocked.Increment(ref parsed);
        Console.WriteLine($"agent {r + 1} called {call.Name}({string.Join(", ", call.Arguments?.Select(a => $"{a.Key}: {a.Value}") ?? [])})");
    }
});
await Task.WhenAll(toolTurns);
Console.WriteLine($"Tool turn: {toolCalls} tool calls made, {parsed} parsed, {invocations} ran and came back as results.\n");

var rows = new List<(string Call, double TtftMs, long Prompt, long Cached)>();
async Task Ask(string label, IList<ChatMessage> messages)
{
    var sw = Stopwatch.StartNew();
    double ttft = -1;
    long prompt = 0, cached = 0;
    await foreach (var u in chat.GetStreamingResponseAsync(messages, options))
    {
        if (ttft < 0 && u.Contents.Count > 0) ttft = sw.Elapsed.TotalMilliseconds;
        foreach (var usage in u.Contents.OfType<UsageContent>())
        {
            prompt = usage.Details.InputTokenCount ?? 0;
            cached = usage.Details.CachedInputTokenCount ?? 0;
        }
    }
    lock (rows) rows.Add((label, ttft, prompt, cached));
}

// Round 1: every agent answers every question at once; they share the head, which is computed once and reused.
for (int round = 1; round <= 2; round++)
{
    var calls = from r in Enumerable.Range(0, roles.Length)
                from q in questions
                select Ask($"round {round} agent {r + 1}: {q}", [new(ChatRole.System, SharedHead + $"\nYou are {roles[r]}."), new(ChatRole.User, q)]);
    await Task.WhenAll(calls);
}

// RAG: one document, several questions; the document's blocks are computed by the first question and reused.
var document = string.Join(" ", Enumerable.Range(1, 40).Select(i => $"Day {i}: sold {100 + i * 3 % 17} loaves, used {20 + i % 7} kg of flour."));
foreach (var q in new[] { "Which day sold the most loaves?", "How much flour was used on day 12?", "What is the average daily flour use?" })
    await Ask($"rag: {q}", [new(ChatRole.System, "Answer from this document only:\n" + document), new(ChatRole.User, q)]);

Console.WriteLine($"{"call",-62} {"ttft ms",8} {"prompt",7} {"cached",7}");
foreach (var (call, ttft, prompt, cached) in rows)
    Console.WriteLine($"{(call.Length > 62 ? call[..59] + "..." : call),-62} {ttft,8:F0} {prompt,7} {cached,7}");
var stats = engine.Stats;
Console.WriteLine($"\nPrefix cache: {stats.PrefixCacheHitTokens} of {stats.PromptTokens} prompt tokens served from cache (hit rate {stats.PrefixCacheHitRate:P0}); {stats.PrefillTokens} prefill tokens computed.");

internal enum Ingredient { Flour, Sugar, Butter, Yeast }

internal enum Staff { Ana, Ben, Chloe }
