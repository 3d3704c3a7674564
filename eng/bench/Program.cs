using System.CommandLine;
using LocalVllm.Bench;

// libtorch's OpenMP runtime reads OMP_WAIT_POLICY when it loads: every command sets it (TorchRuntime.Configure, as the
// engine does) before it first touches TorchSharp; compare loads llama.cpp's libraries before that.

var size = new Option<string>("--size") { Description = "qwen3-0.6b (random weights, Qwen3-0.6B's shape), stories (the stories260K fixture) or a model directory", DefaultValueFactory = _ => "stories" };
var numSeqs = new Option<int>("--num-seqs") { Description = "sequences in the workload", DefaultValueFactory = _ => 64 };
var minInput = new Option<int>("--min-input") { DefaultValueFactory = _ => 32 };
var maxInput = new Option<int>("--max-input") { DefaultValueFactory = _ => 256 };
var minOutput = new Option<int>("--min-output") { DefaultValueFactory = _ => 32 };
var maxOutput = new Option<int>("--max-output") { DefaultValueFactory = _ => 128 };
var seed = new Option<int>("--seed") { DefaultValueFactory = _ => 0 };
var threads = new Option<int?>("--threads") { Description = "libtorch intra-op threads (default: libtorch's)" };
var json = new Option<string?>("--json") { Description = "write the results as JSON to this file" };

var throughput = new Command("throughput", "nano-vllm's throughput workload scaled to this machine: batched engine vs one request at a time")
{
    size, numSeqs, minInput, maxInput, minOutput, maxOutput, seed, threads, json,
};
throughput.SetAction(r => ThroughputBench.Run(new ThroughputBench.Settings(
    r.GetValue(size)!, r.GetValue(numSeqs), r.GetValue(minInput), r.GetValue(maxInput),
    r.GetValue(minOutput), r.GetValue(maxOutput), r.GetValue(seed), r.GetValue(threads), r.GetValue(json))));

var agents = new Option<int>("--agents") { DefaultValueFactory = _ => 2 };
var conversations = new Option<int>("--conversations") { DefaultValueFactory = _ => 4 };
var turns = new Option<int>("--turns") { DefaultValueFactory = _ => 2 };
var headTokens = new Option<int>("--head-tokens") { DefaultValueFactory = _ => 1500 };
var userTokens = new Option<int>("--user-tokens") { DefaultValueFactory = _ => 40 };
var replyTokens = new Option<int>("--reply-tokens") { DefaultValueFactory = _ => 8 };
var docTokens = new Option<int>("--doc-tokens") { DefaultValueFactory = _ => 2000 };
var ragQuestions = new Option<int>("--rag-questions") { DefaultValueFactory = _ => 16 };
var batched = new Option<int>("--max-num-batched-tokens") { DefaultValueFactory = _ => 8192 };
var agentsSize = new Option<string>("--size") { Description = "qwen3-0.6b (default), stories or a model directory", DefaultValueFactory = _ => "qwen3-0.6b" };
var agentsCmd = new Command("agents", "multi-agent and RAG workload: no prefix caching vs plain prefix caching vs the agent-tuned cache")
{
    agentsSize, agents, conversations, turns, headTokens, userTokens, replyTokens, docTokens, ragQuestions, batched, threads, json,
};
agentsCmd.SetAction(r => AgentsBench.Run(new AgentsBench.Settings(r.GetValue(agentsSize)!, r.GetValue(agents), r.GetValue(conversations),
    r.GetValue(turns), r.GetValue(headTokens), r.GetValue(userTokens), r.GetValue(replyTokens), r.GetValue(docTokens), r.GetValue(ragQuestions),
    r.GetValue(batched), r.GetValue(threads), r.GetValue(json))));

var workloads = new Option<string>("--workloads") { Description = "comma-separated shared/bench/workloads names", DefaultValueFactory = _ => "stories-b64,qwen3-single,qwen3-b16" };
var compareThreads = new Option<int>("--threads") { DefaultValueFactory = _ => 2 };
var oursOnly = new Option<bool>("--ours-only") { Description = "run only our engine (no llama.cpp, no agreement check): for profiling" };
var profile = new Option<bool>("--profile") { Description = "print our forward pass split into linear layers, attention, LM head and other ops" };
var repeat = new Option<int>("--repeat") { Description = "runs per engine and workload, alternating; the median run is reported", DefaultValueFactory = _ => 1 };
var weightFormat = new Option<string>("--weights") { Description = "f32 (default), bf16 (ours in bf16 against llama.cpp F16 and BF16) or int8 (ours int8 against Q8_0)", DefaultValueFactory = _ => "f32" };
var compareCmd = new Command("compare", "LocalVllm against llama.cpp (LLamaSharp) on the shared workload files, same weights, same threads")
{
    workloads, compareThreads, json, oursOnly, profile, repeat, weightFormat,
};
compareCmd.SetAction(r => CompareBench.Run(new CompareBench.Settings(r.GetValue(workloads)!.Split(','), r.GetValue(compareThreads), r.GetValue(json), null,
    r.GetValue(oursOnly), r.GetValue(profile), r.GetValue(repeat), r.GetValue(weightFormat)!)));

var microThreads = new Option<int>("--threads") { DefaultValueFactory = _ => 2 };
var microPart = new Option<string>("--part") { Description = "all, formats (float32, bfloat16 and int8 weights, 1-64 rows), linear (single: 1 row, small: 1-16 rows, mid: 16-256, prefill: 512-8,192), int8 (float32 against int8 inputs), attention, sampler, stream or peak", DefaultValueFactory = _ => "all" };
var microCmd = new Command("micro", "the linear layers (libtorch vs SmallBatchLinear kernels) and the decode attention of a Qwen3-0.6B step") { microThreads, microPart };
microCmd.SetAction(r => MicroBench.Run(r.GetValue(microThreads), r.GetValue(microPart)!));

var outTokens = new Option<int>("--tokens") { Description = "tokens generated per request", DefaultValueFactory = _ => 4000 };
var outRequests = new Option<int>("--requests") { Description = "requests generating at once", DefaultValueFactory = _ => 4 };
var outKind = new Option<string>("--output-kind") { Description = "cumulative, delta or final", DefaultValueFactory = _ => "delta" };
var outputsCmd = new Command("outputs", "output processing per step over a long generation (early steps against late ones)") { outTokens, outRequests, outKind, json };
outputsCmd.SetAction(r => OutputsBench.Run(new OutputsBench.Settings(r.GetValue(outTokens), r.GetValue(outRequests), r.GetValue(outKind)!, r.GetValue(json))));

var serveSize = new Option<string>("--size") { Description = "stories (default), qwen3-0.6b or a model directory", DefaultValueFactory = _ => "stories" };
var clients = new Option<int>("--clients") { Description = "concurrent streaming clients", DefaultValueFactory = _ => 16 };
var promptTokens = new Option<int>("--prompt-tokens") { DefaultValueFactory = _ => 64 };
var outputTokens = new Option<int>("--output-tokens") { DefaultValueFactory = _ => 64 };
var serveRepeat = new Option<int>("--repeat") { Description = "rounds (in-process, then HTTP); the median is reported", DefaultValueFactory = _ => 3 };
var waves = new Option<int>("--waves") { Description = "requests each client sends one after another per round (longer rounds, steadier figures)", DefaultValueFactory = _ => 1 };
var streamInterval = new Option<int>("--stream-interval") { Description = "the engine's StreamInterval (vLLM's --stream-interval) for both paths", DefaultValueFactory = _ => 1 };
var cpuByThread = new Option<bool>("--cpu-by-thread") { Description = "print each run's CPU time by thread name" };
var serveHttp2 = new Option<bool>("--http2") { Description = "serve HTTP/2 without TLS and send every client's stream over one connection" };
var serveFloor = new Option<bool>("--floor") { Description = "also measure what loopback TCP alone costs per event on this host, and the HTTP / in-process ratio it leaves at most" };
var serveClient = new Option<string>("--client") { Description = "httpclient (one HttpClient, a thread-pool read per event) or polled (one thread polling every connection: the least a client can cost this host)", DefaultValueFactory = _ => "httpclient" };
var serveApi = new Option<string>("--api") { Description = "completions (token-id prompts) or chat (the chat client in-process, /v1/chat/completions over HTTP)", DefaultValueFactory = _ => "completions" };
var serveCmd = new Command("serve", "the OpenAI-compatible server over loopback against the same engine in-process: throughput and time to first token")
{
    serveSize, clients, promptTokens, outputTokens, serveRepeat, waves, streamInterval, cpuByThread, serveApi, threads, json, serveHttp2, serveFloor, serveClient,
};
serveCmd.SetAction(r => ServeBench.Execute(new ServeBench.Settings(r.GetValue(serveSize)!, r.GetValue(clients), r.GetValue(promptTokens),
    r.GetValue(outputTokens), r.GetValue(serveRepeat), r.GetValue(waves), r.GetValue(streamInterval), r.GetValue(cpuByThread), r.GetValue(serveApi)!, r.GetValue(threads), r.GetValue(json), r.GetValue(serveHttp2), r.GetValue(serveFloor), r.GetValue(serveClient)!)));

var prSize = new Option<string>("--size") { Description = "stories (default), qwen3-0.6b or a model directory", DefaultValueFactory = _ => "stories" };
var prBackground = new Option<int>("--background") { Description = "background requests, all sent at the start", DefaultValueFactory = _ => 64 };
var prBackgroundTokens = new Option<int>("--background-tokens") { DefaultValueFactory = _ => 300 };
var prInteractive = new Option<int>("--interactive") { Description = "interactive requests, one every --interval-ms", DefaultValueFactory = _ => 16 };
var prInteractiveTokens = new Option<int>("--interactive-tokens") { DefaultValueFactory = _ => 16 };
var prInterval = new Option<int>("--interval-ms") { DefaultValueFactory = _ => 25 };
var prMaxNumSeqs = new Option<int>("--max-num-seqs") { DefaultValueFactory = _ => 8 };
var prRepeat = new Option<int>("--repeat") { Description = "rounds of both policies, taking turns going first; medians", DefaultValueFactory = _ => 3 };
var priorityCmd = new Command("priority", "interactive requests behind a background batch: latency and background throughput under fcfs and priority scheduling")
{
    prSize, prBackground, prBackgroundTokens, prInteractive, prInteractiveTokens, prInterval, prMaxNumSeqs, prRepeat, json,
};
priorityCmd.SetAction(r => PriorityBench.Execute(new PriorityBench.Settings(r.GetValue(prSize)!, r.GetValue(prBackground), r.GetValue(prBackgroundTokens),
    r.GetValue(prInteractive), r.GetValue(prInteractiveTokens), r.GetValue(prInterval), r.GetValue(prMaxNumSeqs), r.GetValue(prRepeat), r.GetValue(json))));

var spSize = new Option<string>("--size") { Description = "stories (default: the trained fixture and its prompts), qwen3-0.6b (random weights, random prompts) or a model directory", DefaultValueFactory = _ => "stories" };
var spRequests = new Option<int>("--requests") { Description = "requests at once (1: a single user)", DefaultValueFactory = _ => 1 };
var spTokens = new Option<int>("--tokens") { Description = "tokens generated per request", DefaultValueFactory = _ => 256 };
var spDrafts = new Option<int>("--num-speculative-tokens") { DefaultValueFactory = _ => 4 };
var spRepeat = new Option<int>("--repeat") { Description = "rounds of both engines, taking turns going first; medians", DefaultValueFactory = _ => 3 };
var spThreads = new Option<int?>("--threads") { Description = "libtorch intra-op threads (default: libtorch's)" };
var spTemperature = new Option<float>("--temperature") { Description = "0 (default: greedy, outputs checked identical) or a sampling temperature (unseeded)", DefaultValueFactory = _ => 0f };
var specCmd = new Command("spec", "speculative decoding by prompt lookup against plain decoding: throughput, acceptance, identical outputs")
{
    spSize, spRequests, spTokens, spDrafts, spRepeat, spThreads, spTemperature, json,
};
specCmd.SetAction(r => SpecBench.Execute(new SpecBench.Settings(r.GetValue(spSize)!, r.GetValue(spRequests), r.GetValue(spTokens), r.GetValue(spDrafts),
    r.GetValue(spRepeat), r.GetValue(spThreads), r.GetValue(json), r.GetValue(spTemperature))));

var loraSize = new Option<string>("--size") { Description = "qwen3-0.6b (default), stories or a model directory", DefaultValueFactory = _ => "qwen3-0.6b" };
var loraRequests = new Option<int>("--requests") { Description = "requests at once", DefaultValueFactory = _ => 8 };
var loraTokens = new Option<int>("--tokens") { Description = "tokens generated per request", DefaultValueFactory = _ => 32 };
var loraRank = new Option<int>("--rank") { Description = "the adapters' rank", DefaultValueFactory = _ => 16 };
var loraRepeat = new Option<int>("--repeat") { Description = "rounds of the three workloads, in rotating order; medians", DefaultValueFactory = _ => 3 };
var loraCmd = new Command("lora", "LoRA adapters' cost: the same batch on the base model, under one adapter, and under two")
{
    loraSize, loraRequests, loraTokens, loraRank, loraRepeat, spThreads, json,
};
loraCmd.SetAction(r => LoraBench.Execute(new LoraBench.Settings(r.GetValue(loraSize)!, r.GetValue(loraRequests), r.GetValue(loraTokens), r.GetValue(loraRank),
    r.GetValue(loraRepeat), r.GetValue(spThreads), r.GetValue(json))));

var mbFilter = new Option<string?>("--filter") { Description = "only case files whose name contains this" };
var mbLimit = new Option<int>("--limit") { Description = "at most this many case files", DefaultValueFactory = _ => int.MaxValue };
var mbVerbose = new Option<bool>("--verbose") { Description = "print every compile, validation and invalidation error" };
var mbCompileOnly = new Option<bool>("--compile-only") { Description = "only compile the schemas (compile errors and times)" };
var maskbenchCmd = new Command("maskbench", "MaskBench (JSONSchemaBench) over shared/fixtures/maskbench with the Qwen3 tokenizer, one thread") { mbFilter, mbLimit, json, mbVerbose, mbCompileOnly };
maskbenchCmd.SetAction(r => MaskBench.Run(new MaskBench.Settings(r.GetValue(mbFilter), r.GetValue(mbLimit), r.GetValue(json), r.GetValue(mbVerbose), r.GetValue(mbCompileOnly))));

var soWorkload = new Option<string>("--workload") { Description = "a shared/bench/workloads name", DefaultValueFactory = _ => "qwen3-b16" };
var soThreads = new Option<int>("--threads") { DefaultValueFactory = _ => 2 };
var soRepeat = new Option<int>("--repeat") { Description = "runs of each, alternating; the median is reported", DefaultValueFactory = _ => 3 };
var structuredCmd = new Command("structured", "a workload with every request under a JSON Schema against the same run unconstrained") { soWorkload, soThreads, soRepeat };
structuredCmd.SetAction(r => StructuredBench.Run(new StructuredBench.Settings(r.GetValue(soWorkload)!, r.GetValue(soThreads), r.GetValue(soRepeat))));

var qSize = new Option<string>("--size") { Description = "stories (the fixture's texts) or qwen3-0.6b (a long token sequence)", DefaultValueFactory = _ => "stories" };
var qTokens = new Option<int>("--tokens") { Description = "tokens of the Qwen3-shaped model's sequence", DefaultValueFactory = _ => 1024 };
var qThreads = new Option<int>("--threads") { DefaultValueFactory = _ => 2 };
var qualityCmd = new Command("quality", "mean KL divergence and top-1 agreement of bf16/int8 (ours) and F32/Q8_0 (llama.cpp) against our float32") { qSize, qTokens, qThreads, json };
qualityCmd.SetAction(r => QualityBench.Run(new QualityBench.Settings(r.GetValue(qSize)!, r.GetValue(qTokens), r.GetValue(qThreads), r.GetValue(json))));

var memSize = new Option<string>("--size") { Description = "qwen3-0.6b or stories", DefaultValueFactory = _ => "qwen3-0.6b" };
var memoryCmd = new Command("memory", "resident memory of a loaded model in each format, ours and llama.cpp's, each in a fresh process") { memSize, json };
memoryCmd.SetAction(r => MemoryBench.Run(r.GetValue(memSize)!, r.GetValue(json)));
var childArgs = new Argument<string[]>("args") { Arity = ArgumentArity.OneOrMore };
var memoryChild = new Command("memory-child", "(internal) one load for the memory bench") { childArgs };
memoryChild.Hidden = true;
memoryChild.SetAction(r => MemoryBench.Child(r.GetValue(childArgs)!));

var root = new RootCommand("LocalVllm benchmarks") { memoryCmd, memoryChild,  throughput, agentsCmd, compareCmd, microCmd, outputsCmd, serveCmd, priorityCmd, specCmd, loraCmd, maskbenchCmd, structuredCmd, qualityCmd };
return root.Parse(args).Invoke();
