using LocalVllm.Server;

ServerOptions options;
try
{
    options = ServerOptions.Parse(args);
}
catch (ArgumentException e)
{
    if (e.Message != "help") Console.Error.WriteLine($"error: {e.Message}\n");
    Console.Error.WriteLine(ServerOptions.Usage);
    return e.Message == "help" ? 0 : 2;
}

await using var server = LocalVllmServer.Create(options);
await server.App.RunAsync();
return 0;
