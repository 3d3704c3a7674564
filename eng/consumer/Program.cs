// A consumer app as a user writes it: it takes the LocalVllm package from a feed and knows nothing of this
// repository. eng/consumer/run.sh copies it into a folder outside the checkout (so no Directory.Build.* of ours
// applies), packs the two packages into a local feed, and builds and runs it against a model directory.
using LocalVllm;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.DependencyInjection;

if (args.Length != 1)
{
    Console.Error.WriteLine("usage: consumer <model directory or owner/name>");
    return 2;
}

var services = new ServiceCollection();
services.AddLocalVllm(o =>
{
    o.Model = args[0];
    o.Engine.KvCacheMemoryBytes = 16L << 20;
});
await using var provider = services.BuildServiceProvider();
var chat = provider.GetRequiredService<IChatClient>();

var options = new ChatOptions { Temperature = 0, MaxOutputTokens = 8, AdditionalProperties = new() { ["ignore_eos"] = true } };
var response = await chat.GetResponseAsync("What is the capital of France?", options);
var usage = response.Usage;
Console.WriteLine($"model: {response.ModelId}");
Console.WriteLine($"reply: {response.Text}");
Console.WriteLine($"usage: input {usage?.InputTokenCount}, output {usage?.OutputTokenCount}, total {usage?.TotalTokenCount}, cached {usage?.CachedInputTokenCount}");
return usage?.OutputTokenCount == 8 && usage.InputTokenCount > 0 ? 0 : 1;
