global using Xunit;
global using LocalVllm.Engine.Tests;
